"""Shared fixtures: tiny random-weight models built from transformers configs (no downloads),
a transformers greedy reference, and a KV-leak check around every engine a test creates."""

import random
from pathlib import Path

import pytest
import torch

from server.engine import LLM

CORPUS = [
    "The quick brown fox jumps over the lazy dog. What is 2+3? Answer: 5.",
    "Wait, let me recount the letters in strawberry: s-t-r-a-w-b-e-r-r-y has three r's.",
    "Let x be a real number such that x^2 = 4. Then x = 2 or x = -2.",
    "héllo wörld 你好 ünïcödé 🙂 — résumé naïve café",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3's generation prompt: thinking is the model's to open, or closed up front when disabled.
QWEN3_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(
    "<|im_start|>assistant\n{% endif %}",
    "<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}",
)
# R1-distill style: the generation prompt opens thinking itself.
R1_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant\n<think>\n{% endif %}")
# Llama 3 style: the template writes the BOS token itself.
BOS_CHAT_TEMPLATE = "{{ bos_token }}" + CHAT_TEMPLATE
EXTRA_EMBEDDING_ROWS = 20  # ids the tokenizer does not know, as real Qwen checkpoints have


def build_tokenizer(chat_template: str = CHAT_TEMPLATE, think_tokens: bool = False, bos: bool = False):
    """A small byte-level BPE with ChatML specials. `think_tokens` adds `<think>` / `</think>` as
    added (not special) tokens, as Qwen3's tokenizer has them; `bos` makes `<|endoftext|>` a BOS
    that encoding prepends, as Llama tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    extra = {}
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
        extra["bos_token"] = "<|endoftext|>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", **extra)
    if think_tokens:
        fast.add_tokens(["<think>", "</think>"])
    fast.chat_template = chat_template
    return fast


def build_tiny_model(path: Path, arch: str, tokenizer=None, **overrides) -> Path:
    """Save a random-weight Llama, Qwen2 or Qwen3 (GQA) with a small BPE tokenizer into `path`
    (Qwen3's has its think tokens and chat template)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    if tokenizer is None:
        tokenizer = build_tokenizer(QWEN3_CHAT_TEMPLATE, think_tokens=True) if arch == "qwen3" else build_tokenizer()
    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer) + EXTRA_EMBEDDING_ROWS,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        pad_token_id=None,
        initializer_range=0.2,  # spread the logits so greedy ties (and fp32 noise flips) are rare
    )
    common.update(overrides)
    torch.manual_seed({"llama": 0, "qwen2": 1, "qwen3": 2}[arch])
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(rope_theta=10000.0, **common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(rope_theta=1000000.0, tie_word_embeddings=True, **common))
    elif arch == "qwen3":  # head_dim apart from hidden_size / heads, as in real Qwen3 configs
        common.setdefault("head_dim", 32)
        model = Qwen3ForCausalLM(Qwen3Config(rope_theta=1000000.0, tie_word_embeddings=True, **common))
    else:
        raise ValueError(arch)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("qwen2"), "qwen2")


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("qwen3"), "qwen3")


@pytest.fixture(scope="session", params=["llama", "qwen2", "qwen3"])
def model_dir(request) -> Path:
    return request.getfixturevalue(f"{request.param}_dir")


def random_prompts(n: int, vocab: int, seed: int = 0, min_len: int = 1, max_len: int = 80) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(min_len, max_len))] for _ in range(n)]


_HF_MODELS: dict[str, torch.nn.Module] = {}


def hf_model(model_dir: Path) -> torch.nn.Module:
    """The transformers model of a test checkpoint, fp32, loaded once per session."""
    from transformers import AutoModelForCausalLM

    key = str(model_dir)
    if key not in _HF_MODELS:
        _HF_MODELS[key] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return _HF_MODELS[key]


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy `generate`, one prompt at a time (no padding), stopping at EOS."""
    model = hf_model(model_dir)
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
            outputs.append(out[0, len(prompt) :].tolist())
    return outputs


def assert_no_kv_leak(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.has_unfinished()
    assert not engine.sequences
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks, f"{bm.num_blocks - bm.num_free_blocks} KV blocks leaked"
    assert all(c == 0 for c in bm.ref_counts)


@pytest.fixture
def make_llm():
    """Build an `LLM`, in fp32 unless the test asks for another dtype (the CPU's `auto` is bf16
    where it has native bf16; greedy equality with transformers is pinned in fp32); after the
    test, every KV block of every engine built must be free again."""
    built: list[LLM] = []

    def make(model_dir, **config) -> LLM:
        config.setdefault("dtype", "float32")
        llm = LLM(model_dir, **config)
        built.append(llm)
        return llm

    yield make
    for llm in built:
        assert_no_kv_leak(llm)
