"""Gemma 2 and Gemma 3 through the engine: greedy tokens and top-5 log-probabilities equal transformers'
`generate` (eager attention) for prompts of different lengths batched together, the local layers' window
(16) shorter than every sequence but the first prompt."""

from __future__ import annotations

import pytest

from tests.conftest import assert_engine_matches_transformers
from tests.tiny_gemma import build_tiny_gemma

NEW_TOKENS = 32
LENGTHS = [5, 23, 41]


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_greedy_and_logprobs_match_transformers(arch, tmp_path):
    hf_model = build_tiny_gemma(arch, tmp_path, num_hidden_layers=2, sliding_window=16)  # local, global
    assert_engine_matches_transformers(hf_model, tmp_path, LENGTHS, NEW_TOKENS)
