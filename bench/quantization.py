"""What `--quantization int4` costs in output quality and buys in speed, on the embedded model.

Quality, two ways:
  - perplexity of a fixed English text (below) under fp32, bf16 and bf16 + int4 weights, and how
    often each one's most likely next token is fp32's (teacher-forced top-1 agreement). The text
    is fed one token at a time through transformers' model with our linear layers swapped in,
    so the int4 layers run the same one-row kernel a decode step runs;
  - the engine's greedy replies to --num-prompts chat questions: int4's against bf16's (equal
    replies, and tokens until the first difference).
Speed: the engine's ms per token for one stream (bf16 vs int4), side by side in this run.

    python bench/quantization.py
"""

import argparse
import math
import time
from pathlib import Path

import torch
from results_io import save

from server.engine import LLM, SamplingParams
from server.models.default_model import default_model_dir
from server.models.packed_linear import pack_linears

TEXT = """The river rose slowly through the spring, and by the first week of May it had covered the
lower fields. The farmers moved their animals to the hill behind the church, where the grass was
thin but dry. Nobody in the village remembered a flood like it, although the oldest woman said her
mother had told her of one, long before the railway came. In the evenings people gathered at the
bridge to watch the water and to guess how much higher it would climb. The school closed for two
weeks, and the children spent their days carrying sandbags and bread. When the water finally fell,
it left a layer of brown mud over everything: the roads, the gardens, the floors of the houses near
the bank. It took the whole summer to clean. A scientist who studies rivers later explained that
the flood had three causes. The winter had been unusually wet, so the ground could hold no more
water. The snow in the mountains melted in a single warm week instead of over a month. And a new
road upstream had removed the marshes that used to soak up the extra water like a sponge. Her
advice was simple: give the river room. The village voted to turn the lowest fields back into
wetland, and to build new houses only on higher ground. Ten years later, when the river rose again,
the water spread across the marsh, the birds came back, and the village stayed dry."""

QUESTIONS = [
    "What is the capital of France?", "Name three primary colors.", "What is 12 plus 30?", "Who wrote Hamlet?",
    "Why is the sky blue?", "Give me a synonym for happy.", "How many legs does a spider have?",
    "What is the boiling point of water?", "Write one sentence about cats.", "What is photosynthesis?",
    "Translate 'good morning' into French.", "What is 9 times 7?", "Name a planet larger than Earth.",
    "What does a thermometer measure?", "Suggest a name for a dog.", "What is the opposite of cold?",
]


def hf_model(model_dir: Path, variant: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if variant != "float32":
        model = model.bfloat16()
        pack_linears(model, 1, "int4" if variant == "int4" else None)
    return model


@torch.inference_mode()
def teacher_forced(model, ids: list[int]) -> tuple[list[float], list[int]]:
    """Per position: the log-probability of the text's next token, and the model's top token."""
    past, logprobs, top = None, [], []
    for i in range(len(ids) - 1):
        out = model(torch.tensor([[ids[i]]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        row = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        logprobs.append(row[ids[i + 1]].item())
        top.append(int(row.argmax()))
    return logprobs, top


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--stream-tokens", type=int, default=128)
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    model_dir = default_model_dir()
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(TEXT)["input_ids"]
    text_runs = {}
    for variant in ("float32", "bfloat16", "int4"):
        logprobs, top = teacher_forced(hf_model(model_dir, variant), ids)
        text_runs[variant] = {"perplexity": math.exp(-sum(logprobs) / len(logprobs)), "top": top}
    for variant, run in text_runs.items():
        run["top1_agreement_with_fp32"] = sum(a == b for a, b in zip(run["top"], text_runs["float32"]["top"])) / len(run["top"])
        print(f"{variant:9s} perplexity {run['perplexity']:.3f}, top-1 = fp32's at {100 * run['top1_agreement_with_fp32']:.1f}%"
              f" of {len(ids) - 1} positions", flush=True)
    for run in text_runs.values():
        del run["top"]

    engines, replies = {}, {}
    for name, kw in (("bfloat16", {}), ("int4", {"quantization": "int4"})):
        llm = LLM(model_dir, dtype="bfloat16", **kw)
        prompts = [llm.engine.render_chat([{"role": "user", "content": q}]) for q in QUESTIONS[: args.num_prompts]]
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=args.max_tokens))
        replies[name] = [o.token_ids for o in outs]
        stream = llm.engine.render_chat([{"role": "user", "content": "Tell me a long story."}])
        llm.generate([stream], SamplingParams(temperature=0, max_tokens=8))  # warm-up
        start = time.perf_counter()
        llm.generate([stream], SamplingParams(temperature=0, max_tokens=args.stream_tokens, ignore_eos=True))
        engines[name] = {"ms_per_token_one_stream": 1e3 * (time.perf_counter() - start) / args.stream_tokens,
                         "sample_reply": outs[0].text}
        del llm
    first_difference = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                        for a, b in zip(replies["bfloat16"], replies["int4"]) if a != b]
    greedy = {"equal_replies": sum(a == b for a, b in zip(replies["bfloat16"], replies["int4"])),
              "prompts": len(replies["int4"]), "tokens_until_first_difference": first_difference}
    speedup = engines["bfloat16"]["ms_per_token_one_stream"] / engines["int4"]["ms_per_token_one_stream"]
    print(f"greedy replies: int4 = bf16 for {greedy['equal_replies']}/{greedy['prompts']} prompts; the others differ"
          f" after {first_difference} tokens")
    print(f"one stream: bf16 {engines['bfloat16']['ms_per_token_one_stream']:.1f} ms/token, int4"
          f" {engines['int4']['ms_per_token_one_stream']:.1f} ({speedup:.2f}x)")
    save("quantization", {"args": vars(args), "text_tokens": len(ids), "text": text_runs, "greedy": greedy,
                          "engines": engines, "int4_speedup_one_stream": speedup}, args.out_dir)


if __name__ == "__main__":
    main()
