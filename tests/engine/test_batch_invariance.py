"""A request's output does not depend on what else is in the batch, greedy and seeded alike."""

from __future__ import annotations

import pytest

from gptserve import LLM, SamplingParams
from tests.conftest import random_prompts


@pytest.fixture(scope="module")
def llm(tiny_models):
    path, _ = tiny_models["llama"]
    return LLM(str(path), dtype="fp32", device="cpu", max_num_batched_tokens=128)


def _mixed_params(i: int) -> SamplingParams:
    if i % 2 == 0:
        return SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    return SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=100 + i, max_tokens=24, ignore_eos=True)


@pytest.mark.parametrize("index", [0, 1])
def test_alone_equals_in_batch_of_16(llm, index):
    prompts = random_prompts(16, 512, [5, 31, 12, 64, 2, 47, 20, 9], seed=3)
    params = [_mixed_params(i) for i in range(16)]
    batched = llm.generate(prompts, params)
    alone = llm.generate([prompts[index]], [params[index]])[0]
    assert alone.outputs[0].token_ids == batched[index].outputs[0].token_ids
    assert llm.engine.core.kv.num_free_blocks == llm.engine.core.kv.num_blocks


def test_seeded_sampling_repeats_and_seeds_differ(llm):
    prompt = random_prompts(1, 512, [10], seed=4)[0]
    a = llm.generate(prompt, SamplingParams(temperature=1.0, seed=7, max_tokens=16, ignore_eos=True))[0]
    b = llm.generate(prompt, SamplingParams(temperature=1.0, seed=7, max_tokens=16, ignore_eos=True))[0]
    c = llm.generate(prompt, SamplingParams(temperature=1.0, seed=8, max_tokens=16, ignore_eos=True))[0]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert a.outputs[0].token_ids != c.outputs[0].token_ids
