"""The fused rotary + KV-write kernel against `RotaryEmbedding.rotate_` followed by the plain cache write,
on fresh random inputs, for both rotation layouts, partial rotary, grouped KV heads and padding rows
(GPU only)."""

from __future__ import annotations

import pytest
import torch

from gptserve.layers.rotary import Rope, RotaryEmbedding

pytestmark = pytest.mark.gpu


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: Triton's interpreter


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,rotary_dim,interleaved,dtype",
    [
        (16, 16, 256, 64, True, torch.float16),  # GPT-J-6B
        (9, 3, 64, 64, False, torch.bfloat16),  # Llama-style GQA, full rotary
        (4, 4, 64, 16, False, torch.float16),  # GPT-NeoX-style partial rotary
        (4, 2, 80, 32, True, torch.float32),  # head_dim not a power of two
    ],
)
def test_rotary_kv_write_matches_rotate_then_write(
    num_heads, num_kv_heads, head_dim, rotary_dim, interleaved, dtype
):
    from gptserve.kernels.kv_cache_write import write_kv_reference
    from gptserve.kernels.rotary_kv_write import rotary_kv_write

    torch.manual_seed(torch.randint(0, 2**31, ()).item())
    device = _device()
    rotary = RotaryEmbedding(head_dim, rotary_dim, 4096, interleaved=interleaved).to(device)
    num_tokens, num_slots = 7, 64
    positions = torch.tensor([0, 1, 5, 17, 300, 4095, 2], device=device)
    slots = torch.tensor([3, 9, -1, 40, 41, 63, -1], device=device)  # -1: padding rows
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.randn(num_tokens, width, device=device).to(dtype)
    rope = rotary.cos_sin(positions, dtype)
    cache = torch.randn(2 * num_kv_heads, num_slots, head_dim, device=device).to(dtype)

    # The reference rotates in float32 from the same tables and rounds once, as the kernel does.
    ref_qkv, ref_cache = qkv.to(torch.float32, copy=True), cache.clone()
    rope32 = Rope(rope.cos.float(), rope.sin.float())
    rotary.rotate_(ref_qkv[:, : (num_heads + num_kv_heads) * head_dim], rope32)
    ref_qkv = ref_qkv.to(dtype)
    kv = ref_qkv[:, num_heads * head_dim :].view(num_tokens, 2 * num_kv_heads, head_dim)
    write_kv_reference(kv, ref_cache, slots)

    rotary_kv_write(qkv, rope.cos, rope.sin, num_heads, num_kv_heads, head_dim, interleaved, cache, slots)
    # A fused multiply-add rounds once where the reference rounds twice: within 1e-6 in float32, and in
    # half precision the two float32 results may fall either side of a rounding boundary (one unit).
    tolerance = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(qkv, ref_qkv, rtol=tolerance, atol=1e-5)
    torch.testing.assert_close(cache, ref_cache, rtol=tolerance, atol=1e-5)
