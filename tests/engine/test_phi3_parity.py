"""Phi-3 through the engine: greedy tokens and top-5 log-probabilities equal transformers' `generate` for
prompts of different lengths batched together, with plain RoPE and with LongRoPE below its original length
(short factors, cos and sin scaled by the attention factor)."""

from __future__ import annotations

import pytest

from tests.conftest import assert_engine_matches_transformers
from tests.tiny_phi3 import LONGROPE, build_tiny_phi3

NEW_TOKENS = 32
LENGTHS = [5, 23, 41]
ROPES = {"default": {}, "longrope-short": dict(LONGROPE, original_max_position_embeddings=128)}


@pytest.mark.parametrize("rope", list(ROPES))
def test_greedy_and_logprobs_match_transformers(rope, tmp_path):
    hf_model = build_tiny_phi3(tmp_path, **ROPES[rope])
    assert_engine_matches_transformers(hf_model, tmp_path, LENGTHS, NEW_TOKENS)
