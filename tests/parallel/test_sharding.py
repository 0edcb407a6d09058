"""shard_hf_tensor / merge_hf_shards: the Megatron split of every Hugging Face weight, and its inverse."""

from __future__ import annotations

import pytest
import torch

from gptserve.config import ModelConfig
from gptserve.errors import ModelLoadError
from gptserve.parallel.sharding import (
    check_tensor_parallel,
    merge_hf_shards,
    padded_vocab_size,
    shard_hf_tensor,
    shard_kind,
)
from tests.conftest import ARCHS, build_tiny_model


@pytest.fixture(scope="module")
def tiny_state_dicts(tmp_path_factory) -> dict[str, tuple[ModelConfig, dict[str, torch.Tensor]]]:
    out = {}
    for arch in ARCHS:
        # An odd vocabulary, so the padded vocab split is exercised.
        model = build_tiny_model(arch, tmp_path_factory.mktemp(arch), vocab_size=509)
        out[arch] = (ModelConfig.from_hf(model.config.to_dict()), model.state_dict())
    return out


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("arch", ARCHS)
def test_split_then_merge_is_identity(tiny_state_dicts, arch, world):
    config, state = tiny_state_dicts[arch]
    if config.num_kv_heads % world:
        pytest.skip(f"{config.num_kv_heads} KV heads do not split {world} ways")
    check_tensor_parallel(config, world)
    kinds = set()
    for name, tensor in state.items():
        shards = [shard_hf_tensor(config, name, tensor, r, world) for r in range(world)]
        kind = shard_kind(config, name)
        kinds.add(kind)
        if kind == "replicated":
            assert all(s is tensor for s in shards), name
        else:
            assert sum(s.numel() for s in shards) >= tensor.numel(), name
            assert len({tuple(s.shape) for s in shards}) == 1, name
            assert all(s.is_contiguous() for s in shards), name
        torch.testing.assert_close(merge_hf_shards(config, name, shards), tensor, rtol=0, atol=0)
    assert {"column", "row", "vocab", "replicated"} <= kinds


def test_kinds_per_architecture(tiny_state_dicts):
    expect = {
        "llama": {
            "model.layers.0.self_attn.q_proj.weight": "column",
            "model.layers.0.self_attn.o_proj.weight": "row",
            "model.layers.0.mlp.gate_proj.weight": "column",
            "model.layers.0.mlp.down_proj.weight": "row",
            "model.embed_tokens.weight": "vocab",
            "lm_head.weight": "vocab",
            "model.norm.weight": "replicated",
        },
        "gptj": {
            "transformer.h.0.mlp.fc_in.bias": "column",
            "transformer.h.0.mlp.fc_out.bias": "replicated",
            "lm_head.bias": "vocab",
        },
        "gpt_neox": {
            "gpt_neox.layers.0.attention.query_key_value.weight": "column",
            "gpt_neox.layers.0.attention.dense.weight": "row",
            "gpt_neox.layers.0.attention.dense.bias": "replicated",
            "embed_out.weight": "vocab",
        },
        "gpt2": {
            "transformer.h.0.attn.c_attn.weight": "column",
            "transformer.h.0.mlp.c_proj.weight": "row",
            "transformer.h.0.mlp.c_proj.bias": "replicated",
            "transformer.wpe.weight": "replicated",
            "wte.weight": "vocab",
        },
    }
    for arch, names in expect.items():
        config = tiny_state_dicts[arch][0]
        for name, kind in names.items():
            assert shard_kind(config, name) == kind, (arch, name)


def test_gpt2_c_attn_splits_each_of_q_k_v(tiny_state_dicts):
    config, state = tiny_state_dicts["gpt2"]
    w = state["transformer.h.0.attn.c_attn.weight"]  # Conv1D [hidden, 3 * hidden]
    hidden = config.hidden_size
    rank1 = shard_hf_tensor(config, "transformer.h.0.attn.c_attn.weight", w, 1, 2)
    q, k, v = w.split(hidden, dim=1)
    half = hidden // 2
    torch.testing.assert_close(rank1, torch.cat([q[:, half:], k[:, half:], v[:, half:]], dim=1))


def test_neox_qkv_splits_by_heads(tiny_state_dicts):
    config, state = tiny_state_dicts["gpt_neox"]
    name = "gpt_neox.layers.0.attention.query_key_value.weight"
    w = state[name]
    per_head = w.view(config.num_heads, 3, config.head_dim, -1)
    rank1 = shard_hf_tensor(config, name, w, 1, 2)
    torch.testing.assert_close(rank1, per_head[config.num_heads // 2 :].reshape(-1, w.shape[1]))


def test_vocab_is_padded(tiny_state_dicts):
    config, state = tiny_state_dicts["llama"]
    assert padded_vocab_size(509, 2) == 510
    last = shard_hf_tensor(config, "lm_head.weight", state["lm_head.weight"], 1, 2)
    assert last.shape[0] == 255 and bool((last[-1] == 0).all())


@pytest.mark.parametrize(
    "field,value,words",
    [("num_heads", 5, "5 attention heads"), ("num_kv_heads", 3, "3 key/value heads"),
     ("intermediate_size", 99, "99 intermediate size")],
)  # fmt: skip
def test_indivisible_sizes_raise_with_the_number(tiny_state_dicts, field, value, words):
    config = tiny_state_dicts["llama"][0]
    bad = ModelConfig(**{**config.__dict__, field: value})
    with pytest.raises(ModelLoadError, match=f"{words}.*tensor_parallel_size 2"):
        check_tensor_parallel(bad, 2)
    check_tensor_parallel(bad, 1)
