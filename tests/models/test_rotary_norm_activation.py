"""Shared layers against the transformers functions they must reproduce: RoPE styles and scalings, RMSNorm,
activations."""

from __future__ import annotations

import pytest
import torch
from transformers import GPTNeoXConfig, LlamaConfig
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.gpt_neox import modeling_gpt_neox as hf_neox
from transformers.models.gptj import modeling_gptj as hf_gptj
from transformers.models.llama import modeling_llama as hf_llama

from gptserve.errors import ModelLoadError
from gptserve.layers.activation import ACTIVATIONS, ActAndMul, Activation, SiluAndMul
from gptserve.layers.norms import RMSNorm
from gptserve.layers.rotary import RotaryEmbedding

HEADS, KV_HEADS, HEAD_DIM, TOKENS, MAX_POS = 4, 2, 16, 24, 64


def qk_and_positions(dtype: torch.dtype = torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(TOKENS, HEADS * HEAD_DIM, generator=g).to(dtype)
    k = torch.randn(TOKENS, KV_HEADS * HEAD_DIM, generator=g).to(dtype)
    # Arbitrary order, as in a packed batch of several sequences.
    positions = torch.randint(0, MAX_POS, (TOKENS,), generator=g)
    return q, k, positions


def to_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[T, heads*D] -> transformers' [1, heads, T, D]."""
    return x.view(TOKENS, heads, HEAD_DIM).transpose(0, 1)[None]


def from_heads(x: torch.Tensor) -> torch.Tensor:
    return x[0].transpose(0, 1).reshape(TOKENS, -1)


SCALINGS = {
    "default": None,
    "linear": dict(rope_type="linear", factor=4.0),
    "llama3": dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8,
    ),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scaling", list(SCALINGS))
def test_rotate_half_matches_llama(scaling, dtype):
    theta = 50000.0
    rope = dict(SCALINGS[scaling] or {"rope_type": "default"}, rope_theta=theta)
    hf_config = LlamaConfig(
        hidden_size=HEADS * HEAD_DIM,
        num_attention_heads=HEADS,
        max_position_embeddings=MAX_POS,
        rope_parameters=rope,
    )
    ours = RotaryEmbedding(HEAD_DIM, HEAD_DIM, MAX_POS, theta, SCALINGS[scaling])
    q, k, positions = qk_and_positions(dtype)
    cos, sin = hf_llama.LlamaRotaryEmbedding(hf_config)(q, positions[None])
    q_ref, k_ref = hf_llama.apply_rotary_pos_emb(to_heads(q, HEADS), to_heads(k, KV_HEADS), cos, sin)
    q_out, k_out = ours(positions, q, k)
    torch.testing.assert_close(q_out, from_heads(q_ref), atol=1e-6, rtol=0)
    torch.testing.assert_close(k_out, from_heads(k_ref), atol=1e-6, rtol=0)


def test_partial_rotate_half_matches_gpt_neox():
    hf_config = GPTNeoXConfig(
        hidden_size=HEADS * HEAD_DIM,
        num_attention_heads=HEADS,
        max_position_embeddings=MAX_POS,
        rotary_pct=0.25,
    )
    ours = RotaryEmbedding(HEAD_DIM, HEAD_DIM // 4, MAX_POS)
    q, k, positions = qk_and_positions()
    k = k.repeat(1, 2)  # NeoX has no GQA
    cos, sin = hf_neox.GPTNeoXRotaryEmbedding(hf_config)(q, positions[None])
    q_ref, k_ref = hf_neox.apply_rotary_pos_emb(to_heads(q, HEADS), to_heads(k, HEADS), cos, sin)
    q_out, k_out = ours(positions, q, k)
    torch.testing.assert_close(q_out, from_heads(q_ref), atol=1e-6, rtol=0)
    torch.testing.assert_close(k_out, from_heads(k_ref), atol=1e-6, rtol=0)
    assert torch.equal(q_out.view(TOKENS, HEADS, HEAD_DIM)[..., 4:], q.view(TOKENS, HEADS, HEAD_DIM)[..., 4:])


@pytest.mark.parametrize("rotary_dim", [8, HEAD_DIM])
def test_interleaved_matches_gptj(rotary_dim):
    ours = RotaryEmbedding(HEAD_DIM, rotary_dim, MAX_POS, interleaved=True)
    q, k, positions = qk_and_positions()
    sincos = hf_gptj.create_sinusoidal_positions(MAX_POS, rotary_dim)[positions[None]]
    sin, cos = sincos.chunk(2, dim=-1)

    def reference(x: torch.Tensor, heads: int) -> torch.Tensor:
        x = x.view(1, TOKENS, heads, HEAD_DIM)  # GPT-J rotates in [B, T, heads, D]
        rot = hf_gptj.apply_rotary_pos_emb(x[..., :rotary_dim], sin, cos)
        return torch.cat((rot, x[..., rotary_dim:]), dim=-1).reshape(TOKENS, -1)

    q_out, k_out = ours(positions, q, k)
    torch.testing.assert_close(q_out, reference(q, HEADS), atol=1e-6, rtol=0)
    torch.testing.assert_close(k_out, reference(k, KV_HEADS), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "interleaved,rotary_dim", [(False, HEAD_DIM), (False, 8), (True, HEAD_DIM), (True, 8)]
)
def test_in_place_rotation_of_packed_qkv_matches_forward(interleaved, rotary_dim, dtype):
    """Models rotate q and k together inside the fused qkv output; v and the other rows stay untouched."""
    rope = RotaryEmbedding(HEAD_DIM, rotary_dim, MAX_POS, interleaved=interleaved)
    q, k, positions = qk_and_positions(dtype, seed=3)
    v = torch.randn_like(k)
    qkv = torch.cat((q, k, v), dim=-1)
    q_ref, k_ref = rope(positions, q, k)
    out = rope.rotate_(qkv[:, : q.shape[1] + k.shape[1]], rope.cos_sin(positions, dtype))
    assert out.data_ptr() == qkv.data_ptr()
    assert torch.equal(qkv, torch.cat((q_ref, k_ref, v), dim=-1))


def test_dynamic_ntk_uses_each_positions_own_length():
    factor, theta = 2.0, 10000.0
    hf_config = LlamaConfig(
        hidden_size=HEADS * HEAD_DIM,
        num_attention_heads=HEADS,
        max_position_embeddings=MAX_POS,
        rope_parameters=dict(rope_type="dynamic", factor=factor, rope_theta=theta),
    )
    ours = RotaryEmbedding(HEAD_DIM, HEAD_DIM, MAX_POS, theta, dict(rope_type="dynamic", factor=factor))
    assert ours.max_positions == MAX_POS * factor
    for position in (0, MAX_POS - 1, MAX_POS, MAX_POS + 17, 2 * MAX_POS - 1):
        inv_freq, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf_config, None, seq_len=position + 1)
        angles = position * inv_freq
        expected = torch.cat((angles.cos(), angles.sin()))
        torch.testing.assert_close(ours.cos_sin_cache[position], expected, atol=1e-6, rtol=0)


def test_unsupported_rope_scaling_is_rejected():
    with pytest.raises(ModelLoadError, match="yarn"):
        RotaryEmbedding(HEAD_DIM, HEAD_DIM, MAX_POS, scaling=dict(rope_type="yarn", factor=4.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_llama(dtype):
    ref = hf_llama.LlamaRMSNorm(64, eps=1e-5)
    ours = RMSNorm(64, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(64))
        ours.weight.copy_(ref.weight)
    ref, ours = ref.to(dtype), ours.to(dtype)
    x = (torch.randn(8, 64) * 3).to(dtype)
    assert torch.equal(ours(x), ref(x))


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_matches_act2fn(name):
    x = torch.linspace(-8, 8, 1001)
    torch.testing.assert_close(Activation(name)(x), ACT2FN[name](x), atol=1e-6, rtol=1e-6)


def test_gated_activation_on_fused_gate_up():
    gate, up = torch.randn(5, 16), torch.randn(5, 16)
    fused = torch.cat((gate, up), dim=-1)
    torch.testing.assert_close(SiluAndMul()(fused), torch.nn.functional.silu(gate) * up)
    torch.testing.assert_close(ActAndMul("gelu")(fused), ACT2FN["gelu"](gate) * up)


def test_unknown_activation_is_rejected():
    with pytest.raises(ModelLoadError, match="mish"):
        Activation("mish")
