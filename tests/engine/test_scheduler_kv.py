"""Scheduler and paged KV cache: preemption under a small budget, prefix caching, n > 1 forks."""

from __future__ import annotations

import pytest

from gptserve import LLM, SamplingParams
from tests.conftest import hf_greedy, random_prompts


@pytest.fixture(scope="module")
def model(tiny_models):
    return tiny_models["gpt_neox"]


def test_tiny_kv_budget_preempts_and_every_request_completes(model):
    path, hf_model = model
    # 12 blocks of 16 tokens = 192 slots; 8 requests of up to 60 tokens each need ~480.
    llm = LLM(str(path), dtype="fp32", device="cpu", num_kv_blocks=12, max_num_batched_tokens=256)
    prompts = random_prompts(8, 512, [20, 35, 11, 28], seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    assert llm.engine.core.scheduler.num_preemptions > 0
    for prompt, out in zip(prompts, outputs):
        assert out.outputs[0].token_ids == hf_greedy(hf_model, prompt, 24)[0]
    assert llm.engine.core.kv.num_free_blocks == llm.engine.core.kv.num_blocks


def test_repeated_long_prompt_hits_prefix_cache(model):
    path, hf_model = model
    llm = LLM(str(path), dtype="fp32", device="cpu")
    prompt = random_prompts(1, 512, [100], seed=6)[0]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    first = llm.generate(prompt, params)[0]
    hits_before = llm.engine.core.kv.prefix_hits
    second = llm.generate(prompt, params)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 96  # six full blocks of 16; the last token is always computed
    assert llm.engine.core.kv.prefix_hits - hits_before == 96
    assert second.outputs[0].token_ids == first.outputs[0].token_ids == hf_greedy(hf_model, prompt, 8)[0]
    assert llm.engine.core.kv.num_free_blocks == llm.engine.core.kv.num_blocks


def test_n_samples_share_prompt_blocks(model):
    path, _ = model
    llm = LLM(str(path), dtype="fp32", device="cpu")
    prompt = random_prompts(1, 512, [40], seed=7)[0]
    engine = llm.engine
    engine.add_request(
        "r", prompt, SamplingParams(n=4, temperature=1.0, seed=1, max_tokens=6, ignore_eos=True)
    )
    engine.step()  # prefill + first samples: the 4 sequences now share the prompt's 3 blocks
    request = engine.core.requests["r"]
    assert len(request.seqs) == 4
    shared = request.seqs[0].block_ids[:2]
    assert all(s.block_ids[:2] == shared for s in request.seqs)
    assert all(engine.core.kv.ref_counts[b] == 4 for b in shared)
    outputs = []
    while engine.has_unfinished_requests():
        outputs.extend(o for o in engine.step() if o.finished)
    completions = outputs[0].outputs
    assert len(completions) == 4 and all(len(c.token_ids) == 6 for c in completions)
    assert len({tuple(c.token_ids) for c in completions}) > 1
    assert engine.core.kv.num_free_blocks == engine.core.kv.num_blocks


def test_abort_frees_blocks(model):
    path, _ = model
    llm = LLM(str(path), dtype="fp32", device="cpu")
    engine = llm.engine
    engine.add_request("a", list(range(50)), SamplingParams(max_tokens=100, ignore_eos=True))
    engine.step()
    assert engine.core.kv.num_free_blocks < engine.core.kv.num_blocks
    engine.abort_request("a")
    outputs = engine.step()
    assert outputs[0].finished and outputs[0].outputs[0].finish_reason == "abort"
    assert engine.core.kv.num_free_blocks == engine.core.kv.num_blocks
    assert not engine.has_unfinished_requests()
