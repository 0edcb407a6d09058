"""Gemma 2 and Gemma 3 through the engine: greedy tokens and top-5 log-probabilities equal transformers'
`generate` (eager attention) for prompts of different lengths batched together, the local layers' window
(16) shorter than every sequence but the first prompt."""

from __future__ import annotations

import pytest

from gptserve import LLM, SamplingParams
from tests.conftest import hf_greedy, random_prompts
from tests.tiny_gemma import build_tiny_gemma

NEW_TOKENS = 32
LENGTHS = [5, 23, 41]


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_greedy_and_logprobs_match_transformers(arch, tmp_path):
    hf_model = build_tiny_gemma(arch, tmp_path, num_hidden_layers=2, sliding_window=16)  # local, global
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
