"""Mixtral and Qwen3-MoE through the engine: greedy tokens and top-5 log-probabilities equal transformers'
`generate` for prompts of different lengths batched together."""

from __future__ import annotations

import pytest

from tests.conftest import assert_engine_matches_transformers
from tests.tiny_moe import build_tiny_moe

NEW_TOKENS = 32
LENGTHS = [5, 23, 41]


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_greedy_and_logprobs_match_transformers(arch, tmp_path):
    hf_model = build_tiny_moe(arch, tmp_path)
    assert_engine_matches_transformers(hf_model, tmp_path, LENGTHS, NEW_TOKENS)
