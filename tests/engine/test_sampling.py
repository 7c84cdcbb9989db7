"""Penalties, min-p and logprobs: pinned against a plain loop over transformers' logits, and
seeded-reproducible whatever else is in the batch, like the rest of sampling."""

import pytest
import torch

from server.engine import InvalidSamplingParamError, SamplingParams, ThinkBudget

from ..conftest import hf_model, random_prompts

MAX_NEW = 20


def reference_penalized_greedy(model, prompt: list[int], p: SamplingParams, eos: set[int]) -> list[int]:
    """Greedy decoding on transformers with the OpenAI / HF penalty rules written out by hand."""
    ids = list(prompt)
    out: list[int] = []
    with torch.no_grad():
        while len(out) < MAX_NEW:
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            for token in set(ids):
                value = logits[token]
                logits[token] = value / p.repetition_penalty if value > 0 else value * p.repetition_penalty
            for token in set(out):
                logits[token] -= p.presence_penalty + p.frequency_penalty * out.count(token)
            token = int(logits.argmax())
            ids.append(token)
            out.append(token)
            if token in eos:
                break
    return out


PENALTIES = [
    dict(presence_penalty=1.5),
    dict(frequency_penalty=0.7),
    dict(repetition_penalty=1.8),
    dict(repetition_penalty=0.6),  # < 1 rewards repeats
    dict(presence_penalty=-0.5, frequency_penalty=0.4, repetition_penalty=1.3),
]


def test_penalized_greedy_equals_the_rules_on_transformers_logits(model_dir, make_llm):
    llm = make_llm(model_dir)
    vocab = len(llm.tokenizer)
    prompts = random_prompts(len(PENALTIES) + 2, vocab, seed=21, min_len=5, max_len=30)
    params = [SamplingParams(temperature=0, max_tokens=MAX_NEW, **kw) for kw in PENALTIES]
    params += [SamplingParams(temperature=0, max_tokens=MAX_NEW)] * 2  # unpenalized rows share the batch
    outputs = llm.generate(prompts, params)
    plain = llm.generate(prompts[: len(PENALTIES)], SamplingParams(temperature=0, max_tokens=MAX_NEW))
    model = hf_model(model_dir)
    for prompt, p, out in zip(prompts, params, outputs):
        assert out.token_ids == reference_penalized_greedy(model, prompt, p, llm.engine.eos_token_ids), p
    assert sum(o.token_ids != q.token_ids for o, q in zip(outputs, plain)) >= 3  # the penalties do act


def test_penalties_and_min_p_are_seeded_and_batch_independent(llama_dir, make_llm):
    llm = make_llm(llama_dir)
    prompts = random_prompts(5, len(llm.tokenizer), seed=22)
    sampling = SamplingParams(temperature=1.2, min_p=0.05, presence_penalty=0.5, frequency_penalty=0.3,
                              repetition_penalty=1.2, seed=77, max_tokens=24)
    alone = llm.generate(prompts[0], sampling)[0]
    others = [SamplingParams(temperature=1.0, frequency_penalty=1.0, max_tokens=30)] * 4
    in_batch = llm.generate(prompts, [sampling] + others)[0]
    assert alone.token_ids == in_batch.token_ids
    again = llm.generate(prompts[0], sampling)[0]
    assert again.token_ids == alone.token_ids


def test_min_p_one_keeps_only_the_top_token(llama_dir, make_llm):
    llm = make_llm(llama_dir)
    prompts = random_prompts(4, len(llm.tokenizer), seed=23)
    greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16))
    min_p = llm.generate(prompts, SamplingParams(temperature=2.0, min_p=1.0, max_tokens=16))
    hot = llm.generate(prompts, SamplingParams(temperature=2.0, seed=5, max_tokens=16))
    assert [o.token_ids for o in min_p] == [o.token_ids for o in greedy]
    assert [o.token_ids for o in hot] != [o.token_ids for o in greedy]


def test_logprobs_are_the_models_own_log_softmax(model_dir, make_llm):
    llm = make_llm(model_dir)
    prompt = random_prompts(1, len(llm.tokenizer), seed=24, min_len=10, max_len=10)[0]
    # Sampled at temperature 0.7 with a bias and a penalty: the logprobs stay the model's own.
    sampling = SamplingParams(temperature=0.7, seed=3, max_tokens=12, logprobs=4, logit_bias={7: 3.0},
                              frequency_penalty=0.5, ignore_eos=True)
    out = llm.generate(prompt, sampling)[0]
    assert len(out.logprobs) == len(out.token_ids) == 12
    model = hf_model(model_dir)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out.token_ids[:-1]])).logits[0, len(prompt) - 1 :].float()
    reference = logits.log_softmax(dim=-1)
    for pos, (token, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        assert lp.logprob == pytest.approx(float(reference[pos, token]), abs=1e-4)
        top_ids = [t for t, _ in lp.top]
        assert top_ids == reference[pos].topk(4).indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(reference[pos].topk(4).values.tolist(), abs=1e-4)
    alone = llm.generate(prompt, sampling)[0]
    batch = llm.generate([prompt, [3, 4, 5]], [sampling, SamplingParams(temperature=1.0, max_tokens=8)])[0]
    assert [lp.logprob for lp in batch.logprobs] == pytest.approx([lp.logprob for lp in alone.logprobs], abs=1e-5)
    assert not llm.generate(prompt, SamplingParams(temperature=0, max_tokens=4))[0].logprobs  # not asked for


def test_forced_tokens_have_no_logprobs(model_dir, make_llm):
    llm = make_llm(model_dir)
    prompt = random_prompts(1, len(llm.tokenizer), seed=25, max_len=20)[0]
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40, logprobs=0), ThinkBudget(max_think=6))[0]
    assert out.think_end_forced
    assert len(out.logprobs) == len(out.token_ids)
    assert [lp is None for lp in out.logprobs] == out.forced
    assert all(lp.top == [] for lp in out.logprobs if lp is not None)


@pytest.mark.parametrize("field, value", [
    ("presence_penalty", 2.5), ("frequency_penalty", -3.0), ("repetition_penalty", 0.0),
    ("min_p", 1.5), ("logprobs", 21), ("logprobs", -1),
])
def test_out_of_range_sampling_values_name_their_field(field, value):
    with pytest.raises(InvalidSamplingParamError) as info:
        SamplingParams(**{field: value})
    assert info.value.field == field


def test_draws_follow_the_filtered_distribution_and_never_pick_a_filtered_token():
    """Inverse-CDF draws over 4,000 seeds: frequencies within 3 standard errors of the
    probabilities, and top-k / top-p never pick outside the kept tokens."""
    from server.engine.sampler import Sampler
    from server.engine.sequence import Sequence

    probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03] + [0.0] * 11)
    logits = probs.clamp_min(1e-30).log()[None, :]
    sampler, trials = Sampler(), 4000

    def draws(**params) -> torch.Tensor:
        seqs = [Sequence("r", [1], SamplingParams(temperature=1.0, **params), seed=s) for s in range(trials)]
        return torch.tensor([t for t, _ in sampler(logits.expand(trials, -1).clone(), seqs)])

    counts = torch.bincount(draws(), minlength=16).float() / trials
    assert (counts - probs).abs().max() < 3 * (probs * (1 - probs) / trials).sqrt().max()
    assert set(draws(top_k=2).tolist()) == {0, 1}
    assert set(draws(top_p=0.8).tolist()) <= {0, 1, 2}  # 0.5 + 0.25 < 0.8: the third token stays
