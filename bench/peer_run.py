"""One engine, one round of bench/peers.py's measurements, printed as one JSON line. Runs inside
each engine's own virtual environment, so it imports nothing from this repository except when
the engine is s1serve.

    python -P bench/peer_run.py ENGINE MODEL WORKLOAD.json   # ENGINE: s1serve-<dtype|int4> | vllm-<dtype> | llama.cpp
"""

import json
import sys
import time


def s1serve(model: str, dtype: str):
    from server.engine import LLM, SamplingParams

    quantized = dtype == "int4"  # bf16 activations over 4-bit weights
    llm = LLM(model, dtype="bfloat16" if quantized else dtype, quantization="int4" if quantized else None, max_num_seqs=64)

    def run(prompts, max_tokens):
        outs = llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens])
        return sum(len(o.token_ids) for o in outs)
    return run


def vllm(model: str, dtype: str):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model, dtype=dtype, max_model_len=1024, max_num_seqs=64, seed=0)

    def run(prompts, max_tokens):
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                            [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens],
                            use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)
    return run


def llama_cpp(model: str, dtype: str):
    """llama-cpp-python has no continuous batching: requests run one after another."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=model, n_ctx=1024, n_batch=512, n_threads=2, verbose=False)
    eos = llm.token_eos()

    def no_eos(_ids, scores):
        scores[eos] = -np.inf
        return scores

    def run(prompts, max_tokens):
        total = 0
        for prompt, m in zip(prompts, max_tokens):
            llm.reset()
            for n, _ in enumerate(llm.generate(prompt, temp=0.0, top_k=1, reset=True, logits_processor=[no_eos]), start=1):
                if n == m:
                    break
            total += m
        return total
    return run


def main() -> None:
    engine, model, workload_path = sys.argv[1:4]
    workload = json.loads(open(workload_path).read())
    kind, _, dtype = engine.partition("-")
    start = time.perf_counter()
    run = {"s1serve": s1serve, "vllm": vllm, "llama.cpp": llama_cpp}[kind](model, dtype)
    load_s = time.perf_counter() - start
    run([workload["warmup"]], [4])
    t = time.perf_counter()
    run([workload["stream_prompt"]], [workload["stream_tokens"]])
    ms_per_token = 1000 * (time.perf_counter() - t) / workload["stream_tokens"]
    t = time.perf_counter()
    run([workload["ttft_prompt"]], [1])
    ttft_s = time.perf_counter() - t
    t = time.perf_counter()
    tokens = run(workload["prompts"], workload["max_tokens"])
    throughput = tokens / (time.perf_counter() - t)
    print(json.dumps({"engine": engine, "load_s": load_s, "ms_per_token_one_stream": ms_per_token,
                      "ttft_512_prompt_s": ttft_s, "throughput_tokens_per_s": throughput, "output_tokens": tokens}))


if __name__ == "__main__":
    main()
