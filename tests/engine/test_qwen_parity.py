"""Qwen2 and Qwen3 through the engine: greedy tokens and top-5 log-probabilities equal transformers'
`generate` for prompts of different lengths batched together."""

from __future__ import annotations

import pytest

from tests.conftest import assert_engine_matches_transformers
from tests.tiny_qwen import build_tiny_qwen

NEW_TOKENS = 32
LENGTHS = [5, 23, 41]


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_greedy_and_logprobs_match_transformers(arch, tmp_path):
    hf_model = build_tiny_qwen(arch, tmp_path)
    assert_engine_matches_transformers(hf_model, tmp_path, LENGTHS, NEW_TOKENS)
