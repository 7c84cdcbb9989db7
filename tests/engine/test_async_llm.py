"""The streaming front: deltas add up to the offline result; leaving a stream frees its KV blocks."""

import asyncio
import time

import pytest

from server.engine import AsyncLLM, EmptyPromptError, SamplingParams
from tests.conftest import random_prompts

SAMPLING = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


@pytest.fixture
def async_llm(llama_dir):
    llm = AsyncLLM(llama_dir, dtype="float32")
    yield llm
    llm.shutdown()
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not llm.engine.has_unfinished()


async def collect(llm, prompt, sampling):
    deltas = [d async for d in llm.generate(prompt, sampling)]
    return deltas, [t for d in deltas for t in d.new_token_ids], "".join(d.new_text for d in deltas)


def test_concurrent_streams_match_offline_generation(async_llm, make_llm, llama_dir):
    prompts = random_prompts(8, 400, seed=11)
    offline = make_llm(llama_dir).generate(prompts, SAMPLING)

    async def main():
        return await asyncio.gather(*(collect(async_llm, p, SAMPLING) for p in prompts))

    for (deltas, tokens, text), ref in zip(asyncio.run(main()), offline):
        assert tokens == ref.token_ids and text == ref.text
        assert len(deltas) > 1 and deltas[-1].finished and deltas[-1].finish_reason == "length"
        assert not any(d.finished for d in deltas[:-1])


def test_leaving_a_stream_early_aborts_it_and_frees_its_blocks(async_llm):
    engine = async_llm.engine

    async def main():
        long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
        survivor = asyncio.ensure_future(collect(async_llm, [3, 4, 5], SAMPLING))
        stream = async_llm.generate([1, 2, 3, 4], long, request_id="quitter")
        async for delta in stream:
            if delta.new_token_ids:
                break
        await stream.aclose()  # what a cancelled gRPC handler does
        deltas, tokens, _ = await survivor
        return tokens

    tokens = asyncio.run(main())
    assert len(tokens) == 20  # the other request was not hurt
    deadline = time.monotonic() + 5
    while engine.has_unfinished() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "quitter" not in engine.sequences


def test_bad_request_raises_in_the_caller(async_llm):
    async def main():
        async for _ in async_llm.generate("", SAMPLING):
            pass

    with pytest.raises(EmptyPromptError):
        asyncio.run(main())


def test_budgeted_streams_are_phase_tagged_and_add_up_to_the_offline_result(async_llm, make_llm, llama_dir):
    from server.engine import ThinkBudget

    delimiter = async_llm.engine.think_ids.think_end[0]
    sampling = SamplingParams(temperature=0, max_tokens=60, logit_bias={delimiter: 2.0})
    budgets = [ThinkBudget(min_think=15, max_waits=3), ThinkBudget(max_think=6), ThinkBudget(min_think=8, max_think=12)]
    prompts = random_prompts(3, 400, seed=4)
    offline = make_llm(llama_dir).generate(prompts, sampling, budgets)

    async def stream(prompt, budget):
        return [d async for d in async_llm.generate(prompt, sampling, budget=budget)]

    async def main():
        return await asyncio.gather(*(stream(p, b) for p, b in zip(prompts, budgets)))

    for deltas, ref in zip(asyncio.run(main()), offline):
        assert [t for d in deltas for t in d.new_token_ids] == ref.token_ids
        assert "".join(d.think_text for d in deltas) == ref.think_text
        assert "".join(d.answer_text for d in deltas) == ref.answer_text
        assert [e for d in deltas for e in d.events] == ref.events
        phases = [d.phase for d in deltas]
        assert phases == sorted(phases, key=["think", "answer"].index)  # think, then answer, never back
    assert any("WAIT_INSERTED" in ref.events for ref in offline) and offline[1].events == ["THINK_END_FORCED"]
