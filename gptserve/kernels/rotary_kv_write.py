"""Rotary embedding of q and k and the paged-cache write of k and v, in one kernel.

A rotary model's attention layer, left to PyTorch, rotates q and k in place with four elementwise
kernels (swap the channel pairs, two multiplies, an add) and then copies K and V into the cache with a
fifth; in a one-token decode step each of them costs a launch and little else. Here one program takes one
(token, head) row of the fused qkv projection: a q or k head is rotated in place (its first `rotary_dim`
channels; the rest pass through), and a k or v head is also stored at the token's cache slot (a negative
slot, a padding row of a CUDA-graph batch, writes nothing).

The rotation is the one `RotaryEmbedding.rotate_` computes, x * cos + partner(x) * signed_sin, from the
same `Rope` tables, but in float32 with one rounding to the activation dtype at the end (`rotate_`, like
the Hugging Face reference, rounds each product too, so half-precision results may differ by one unit in
the last place). The
partner of channel c is c ^ 1 in the interleaved layout (GPT-J) and c +- rotary_dim / 2 in the
rotate-half layout (GPT-NeoX, Llama).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kv_write_kernel(
    qkv_ptr,
    cos_ptr,
    sin_ptr,
    cache_ptr,
    slots_ptr,
    stride_qkv_t,
    stride_rope_t,
    stride_cache_h,
    stride_cache_slot,
    num_heads,
    num_kv_heads,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROTARY_DIM: tl.constexpr,
    INTERLEAVED: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    in_head = d < HEAD_DIM
    row = qkv_ptr + token * stride_qkv_t + head.to(tl.int64) * HEAD_DIM
    x = tl.load(row + d, mask=in_head, other=0.0)
    if head < num_heads + num_kv_heads:  # q or k: rotate in place
        rotating = d < ROTARY_DIM
        if INTERLEAVED:
            partner = d ^ 1
        else:
            partner = tl.where(d < ROTARY_DIM // 2, d + ROTARY_DIM // 2, d - ROTARY_DIM // 2)
        xp = tl.load(row + partner, mask=rotating, other=0.0)
        cos = tl.load(cos_ptr + token * stride_rope_t + d, mask=rotating, other=1.0)
        sin = tl.load(sin_ptr + token * stride_rope_t + d, mask=rotating, other=0.0)
        turned = x.to(tl.float32) * cos.to(tl.float32) + xp.to(tl.float32) * sin.to(tl.float32)
        x = tl.where(rotating, turned.to(x.dtype), x)
        tl.store(row + d, x, mask=in_head)
    if head >= num_heads:  # k or v: to the cache (K heads, then V heads, as the cache orders them)
        slot = tl.load(slots_ptr + token).to(tl.int64)
        if slot >= 0:
            dst = cache_ptr + (head - num_heads).to(tl.int64) * stride_cache_h + slot * stride_cache_slot + d
            tl.store(dst, x.to(cache_ptr.dtype.element_ty), mask=in_head)


def rotary_kv_write(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    interleaved: bool,
    cache_slots: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Rotate the q and k heads of qkv [T, (heads + 2 * kv_heads) * head_dim] in place and write its k and
    v heads to cache_slots [2 * kv_heads, num_slots, head_dim] at `slot_mapping` [T] (negative: skipped).
    cos and sin are a `Rope`'s tables ([T, 1, rotary_dim] and the signed sin of the same size)."""
    num_tokens = qkv.shape[0]
    if num_tokens == 0:
        return
    rotary_dim = cos.shape[-1]
    cos, sin = cos.reshape(num_tokens, rotary_dim), sin.reshape(num_tokens, rotary_dim)
    if qkv.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1 or cos.stride(0) != sin.stride(0):
        raise ValueError("qkv and the rotary tables need contiguous rows of the same layout")
    _rotary_kv_write_kernel[(num_tokens, num_heads + 2 * num_kv_heads)](
        qkv,
        cos,
        sin,
        cache_slots,
        slot_mapping,
        qkv.stride(0),
        cos.stride(0),
        cache_slots.stride(0),
        cache_slots.stride(1),
        num_heads,
        num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        ROTARY_DIM=rotary_dim,
        INTERLEAVED=interleaved,
        num_warps=1 if head_dim <= 128 else 2,
    )
