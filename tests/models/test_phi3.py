"""Phi-3: full-sequence logits against transformers on the same random weights (plain RoPE, LongRoPE
below and above the original length, a sliding window, partial rotary), and its tensor-parallel split of
the fused tensors."""

from __future__ import annotations

import pytest
import torch

from gptserve.config import ModelConfig
from gptserve.models.registry import model_class
from gptserve.parallel.sharding import merge_hf_shards, shard_hf_tensor
from tests.tiny_phi3 import LONGROPE, build_tiny_phi3

CASES = {
    "default-rope": ({}, 48),
    "longrope-below-original": (LONGROPE, 24),
    "longrope-above-original": (LONGROPE, 48),
    "sliding-window-16": (dict(sliding_window=16), 48),
    "partial-rotary-mha-tied": (
        dict(partial_rotary_factor=0.5, num_key_value_heads=4, tie_word_embeddings=True),
        48,
    ),
}


def ours_loaded_from(hf: torch.nn.Module) -> torch.nn.Module:
    config = ModelConfig.from_hf(hf.config.to_dict())
    ours = model_class(config)(config).eval()
    ours.load_weights(hf.state_dict().items())
    return ours


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_fp32(case):
    overrides, length = CASES[case]
    hf = build_tiny_phi3(**overrides)
    ours = ours_loaded_from(hf)
    tokens = torch.randint(0, hf.config.vocab_size, (length,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens[None]).logits[0]
        actual = ours.compute_logits(ours(tokens, torch.arange(len(tokens))))
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() < 1e-4


def test_longrope_switches_tables_at_the_original_length():
    config = ModelConfig.from_hf(build_tiny_phi3(**LONGROPE).config.to_dict())
    assert config.rope_scaling["rope_type"] == "longrope"
    rotary = model_class(config)(config).model.rotary_emb
    short = rotary.cos_sin(torch.arange(32), torch.float32)
    long = rotary.cos_sin(torch.arange(33), torch.float32)
    assert not torch.allclose(short.cos[1:32], long.cos[1:32])  # a longer sequence rotates every token anew
    assert torch.equal(short.cos, rotary.cos_sin(torch.arange(32), torch.float32).cos)


@pytest.mark.parametrize("world_size", [2])
def test_fused_tensors_split_per_part(world_size):
    config = ModelConfig.from_hf(build_tiny_phi3().config.to_dict())
    q, kv, inner = 64, 32, 96  # 4 heads and 2 KV heads of 16; intermediate 96
    qkv = torch.arange(q + 2 * kv, dtype=torch.float32)[:, None].expand(-1, 8)
    name = "model.layers.0.self_attn.qkv_proj.weight"
    shards = [shard_hf_tensor(config, name, qkv, rank, world_size) for rank in range(world_size)]
    rows = shards[1][:, 0].long().tolist()  # rank 1: second half of q's rows, of k's and of v's
    assert rows == list(range(32, 64)) + list(range(80, 96)) + list(range(112, 128))
    assert torch.equal(merge_hf_shards(config, name, shards), qkv)
    gate_up = torch.arange(2 * inner, dtype=torch.float32)[:, None].expand(-1, 8)
    name = "model.layers.0.mlp.gate_up_proj.weight"
    shard = shard_hf_tensor(config, name, gate_up, 0, world_size)
    assert shard[:, 0].long().tolist() == list(range(48)) + list(range(96, 144))
