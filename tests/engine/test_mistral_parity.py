"""Mistral through the engine: greedy tokens and top-5 log-probabilities equal transformers' `generate`
(eager attention) once prompt and completion run past the sliding window, for prompts of different
lengths decoded together and for a prompt prefilled in chunks smaller than the window."""

from __future__ import annotations

import pytest

from gptserve import LLM, SamplingParams
from tests.conftest import hf_greedy, random_prompts
from tests.tiny_mistral import WINDOW, build_tiny_mistral

NEW_TOKENS = 32


@pytest.mark.parametrize(
    ("lengths", "budget"),
    [([5, 13, 23, 41], 48), ([40], 8)],
    ids=["batched", "chunked-prefill"],
)
def test_greedy_and_logprobs_match_transformers(lengths, budget, tmp_path):
    hf_model = build_tiny_mistral(tmp_path)
    llm = LLM(str(tmp_path), dtype="fp32", device="cpu", max_num_batched_tokens=budget)
    prompts = random_prompts(len(lengths), hf_model.config.vocab_size, lengths, seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, logprobs=5, ignore_eos=True)
    try:
        outputs = llm.generate(prompts, params)
    finally:
        llm.close()
    for prompt, out in zip(prompts, outputs, strict=True):
        assert len(prompt) + NEW_TOKENS > WINDOW
        ref_tokens, ref_logprobs = hf_greedy(hf_model, prompt, NEW_TOKENS)
        completion = out.outputs[0]
        assert completion.token_ids == ref_tokens
        for step, entry in enumerate(completion.logprobs):
            ref_top = ref_logprobs[step].topk(5)
            assert [t for t, _ in entry.top] == ref_top.indices.tolist()
            for (_, lp), ref in zip(entry.top, ref_top.values.tolist()):
                assert abs(lp - ref) < 1e-4
