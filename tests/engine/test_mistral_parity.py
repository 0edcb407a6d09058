"""Mistral through the engine: greedy tokens and top-5 log-probabilities equal transformers' `generate`
(eager attention) once prompt and completion run past the sliding window, for prompts of different
lengths decoded together and for a prompt prefilled in chunks smaller than the window."""

from __future__ import annotations

import pytest

from tests.conftest import assert_engine_matches_transformers
from tests.tiny_mistral import WINDOW, build_tiny_mistral

NEW_TOKENS = 32


@pytest.mark.parametrize(
    ("lengths", "budget"),
    [([5, 13, 23, 41], 48), ([40], 8)],
    ids=["batched", "chunked-prefill"],
)
def test_greedy_and_logprobs_match_transformers(lengths, budget, tmp_path):
    hf_model = build_tiny_mistral(tmp_path)
    prompts = assert_engine_matches_transformers(hf_model, tmp_path, lengths, NEW_TOKENS, budget)
    assert all(len(prompt) + NEW_TOKENS > WINDOW for prompt in prompts)
