"""Phi-3 through the engine: greedy tokens and top-5 log-probabilities equal transformers' `generate` for
prompts of different lengths batched together, with plain RoPE and with LongRoPE below its original length
(short factors, cos and sin scaled by the attention factor)."""

from __future__ import annotations

import pytest

from gptserve import LLM, SamplingParams
from tests.conftest import hf_greedy, random_prompts
from tests.tiny_phi3 import LONGROPE, build_tiny_phi3

NEW_TOKENS = 32
LENGTHS = [5, 23, 41]
ROPES = {"default": {}, "longrope-short": dict(LONGROPE, original_max_position_embeddings=128)}


@pytest.mark.parametrize("rope", list(ROPES))
def test_greedy_and_logprobs_match_transformers(rope, tmp_path):
    hf_model = build_tiny_phi3(tmp_path, **ROPES[rope])
    llm = LLM(str(tmp_path), dtype="fp32", device="cpu", max_num_batched_tokens=48)
    prompts = random_prompts(len(LENGTHS), hf_model.config.vocab_size, LENGTHS, seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, logprobs=5, ignore_eos=True)
    try:
        outputs = llm.generate(prompts, params)  # together: batched decode, chunked prefill (budget 48)
    finally:
        llm.close()
    for prompt, out in zip(prompts, outputs, strict=True):
        ref_tokens, ref_logprobs = hf_greedy(hf_model, prompt, NEW_TOKENS)
        completion = out.outputs[0]
        assert completion.token_ids == ref_tokens
        for step, entry in enumerate(completion.logprobs):
            ref_top = ref_logprobs[step].topk(5)
            assert [t for t, _ in entry.top] == ref_top.indices.tolist()
            for (_, lp), ref in zip(entry.top, ref_top.values.tolist()):
                assert abs(lp - ref) < 1e-4
