"""Greedy tokens and top-5 log-probabilities equal Hugging Face transformers on every architecture."""

from __future__ import annotations

import pytest

from gptserve import LLM, SamplingParams
from tests.conftest import ARCHS, hf_greedy, random_prompts

NEW_TOKENS = 32
LENGTHS = [3, 17, 40, 9]


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_and_logprobs_match_transformers(arch, tiny_models):
    path, hf_model = tiny_models[arch]
    llm = LLM(str(path), dtype="fp32", device="cpu", max_num_batched_tokens=64)
    prompts = random_prompts(len(LENGTHS), hf_model.config.vocab_size, LENGTHS, seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, logprobs=5, ignore_eos=True)
    outputs = llm.generate(prompts, params)  # all prompts together: batched, chunked prefill (budget 64)
    for prompt, out in zip(prompts, outputs):
        ref_tokens, ref_logprobs = hf_greedy(hf_model, prompt, NEW_TOKENS)
        completion = out.outputs[0]
        assert completion.token_ids == ref_tokens
        assert completion.finish_reason == "length"
        for step, entry in enumerate(completion.logprobs):
            ref_top = ref_logprobs[step].topk(5)
            assert [t for t, _ in entry.top] == ref_top.indices.tolist()
            for (_, lp), ref in zip(entry.top, ref_top.values.tolist()):
                assert abs(lp - ref) < 1e-4
            assert abs(entry.logprob - ref_logprobs[step, entry.token_id].item()) < 1e-4
    assert llm.engine.core.kv.num_free_blocks == llm.engine.core.kv.num_blocks
