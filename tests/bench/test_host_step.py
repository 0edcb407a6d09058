"""`gptserve.bench.host_step`: the engine's host time per step with the model stubbed out; the engine
runs its real model again afterwards."""

from __future__ import annotations

from gptserve.bench.host_step import host_ms_per_step
from gptserve.llm import LLM
from gptserve.sampling_params import SamplingParams
from tests.conftest import random_prompts


def test_host_time_per_step_then_the_model_runs_again(tiny_models):
    path, _ = tiny_models["gptj"]
    llm = LLM(str(path), device="cpu", dtype="fp32", max_model_len=64)
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompts = random_prompts(4, 512, [5, 7, 9, 11])
    real = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]

    ms = host_ms_per_step(llm, prompts, 6)
    assert 0 < ms < 1000
    assert llm.engine.core.kv.num_free_blocks == llm.engine.core.kv.num_blocks
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)] == real
