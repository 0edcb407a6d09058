"""Writing a step's new keys and values into the paged KV cache.

Each new token carries the flat cache slot its K and V go to (block * block_size + offset). A negative
slot marks a padding row of a CUDA-graph batch and is skipped, which a plain `index_copy_` cannot do.
One program copies one (token, K-or-V head) row of head_dim values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
    kv_ptr,
    cache_ptr,
    slots_ptr,
    stride_kv_t,
    stride_kv_h,
    stride_cache_h,
    stride_cache_slot,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    if slot >= 0:
        d = tl.arange(0, BLOCK_D)
        mask = d < HEAD_DIM
        x = tl.load(kv_ptr + token * stride_kv_t + head * stride_kv_h + d, mask=mask)
        dst = cache_ptr + head * stride_cache_h + slot * stride_cache_slot + d
        tl.store(dst, x.to(cache_ptr.dtype.element_ty), mask=mask)


def write_kv(kv: torch.Tensor, cache_slots: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """kv [T, 2 * kv_heads, head_dim] -> cache_slots [2 * kv_heads, num_slots, head_dim] at
    `slot_mapping` [T]; rows whose slot is negative are left out."""
    num_tokens, heads, head_dim = kv.shape
    if kv.stride(-1) != 1:
        kv = kv.contiguous()
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens, heads)](
        kv,
        cache_slots,
        slot_mapping,
        kv.stride(0),
        kv.stride(1),
        cache_slots.stride(0),
        cache_slots.stride(1),
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=1 if head_dim <= 128 else 2,
    )


def write_kv_reference(kv: torch.Tensor, cache_slots: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Plain-PyTorch `write_kv`."""
    keep = slot_mapping >= 0
    cache_slots.index_copy_(1, slot_mapping[keep], kv[keep].transpose(0, 1).to(cache_slots.dtype))
