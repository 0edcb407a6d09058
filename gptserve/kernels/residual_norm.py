"""The residual add of a transformer block fused with the normalisation that follows it.

At the end of a block PyTorch would add the block's outputs to the residual stream (one kernel per add,
one more for a bias left out of a GEMM) and then normalise the sum for the next block (LayerNorm; RMSNorm
and its weight are two more). In a decode step each of these reads and writes a few kilobytes and costs a
launch. Here one program takes one token's row: it sums the residual, one or two deltas and an optional
bias in float32, stores the new residual in the activation dtype, and normalises that stored value (as
the unfused path does) with LayerNorm or RMSNorm, weight and optional bias applied in float32 and the
result rounded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _residual_norm_kernel(
    residual_ptr,
    delta_ptr,
    delta2_ptr,
    bias_ptr,
    weight_ptr,
    norm_bias_ptr,
    new_residual_ptr,
    out_ptr,
    hidden,
    eps,
    stride_residual,
    stride_delta,
    stride_delta2,
    HAS_DELTA2: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_NORM_BIAS: tl.constexpr,
    RMS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0)
    dtype = x.dtype
    total = x.to(tl.float32) + tl.load(delta_ptr + row * stride_delta + cols, mask=mask, other=0.0).to(
        tl.float32
    )
    if HAS_DELTA2:
        total += tl.load(delta2_ptr + row * stride_delta2 + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        total += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    stored = total.to(dtype)
    tl.store(new_residual_ptr + row * hidden + cols, stored, mask=mask)
    v = stored.to(tl.float32)
    if not RMS:  # LayerNorm: centre first
        v = tl.where(mask, v - tl.sum(v, axis=0) / hidden, 0.0)
    variance = tl.sum(v * v, axis=0) / hidden
    y = v * tl.rsqrt(variance + eps) * tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM_BIAS:
        y += tl.load(norm_bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * hidden + cols, y.to(dtype), mask=mask)


def residual_norm(
    residual: torch.Tensor,
    delta: torch.Tensor,
    weight: torch.Tensor,
    norm_bias: torch.Tensor | None,
    eps: float,
    rms: bool = False,
    delta2: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(r), r) with r = residual + delta (+ delta2) (+ bias), for [T, hidden] rows (the last
    dimension contiguous) and [hidden] vectors; norm is LayerNorm, or RMSNorm with `rms`."""
    hidden = residual.shape[-1]
    rows = [t.reshape(-1, hidden) for t in (residual, delta, delta if delta2 is None else delta2)]
    if any(t.stride(-1) != 1 for t in rows):
        raise ValueError("residual_norm needs rows whose last dimension is contiguous")
    new_residual = torch.empty(residual.shape, dtype=residual.dtype, device=residual.device)
    out = torch.empty_like(new_residual)
    num_rows = rows[0].shape[0]
    if num_rows == 0:
        return out, new_residual
    block = triton.next_power_of_2(hidden)
    _residual_norm_kernel[(num_rows,)](
        rows[0],
        rows[1],
        rows[2],
        weight if bias is None else bias,
        weight,
        weight if norm_bias is None else norm_bias,
        new_residual,
        out,
        hidden,
        eps,
        rows[0].stride(0),
        rows[1].stride(0),
        rows[2].stride(0),
        HAS_DELTA2=delta2 is not None,
        HAS_BIAS=bias is not None,
        HAS_NORM_BIAS=norm_bias is not None,
        RMS=rms,
        BLOCK=block,
        num_warps=min(max(block // 512, 1), 16),
    )
    return out, new_residual


def residual_norm_reference(
    residual: torch.Tensor,
    delta: torch.Tensor,
    weight: torch.Tensor,
    norm_bias: torch.Tensor | None,
    eps: float,
    rms: bool = False,
    delta2: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`residual_norm` in plain PyTorch: the sum in float32 rounded once, the norm of the rounded sum."""
    total = residual.float() + delta.float()
    if delta2 is not None:
        total = total + delta2.float()
    if bias is not None:
        total = total + bias.float()
    new_residual = total.to(residual.dtype)
    v = new_residual.float()
    if rms:
        y = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)
    else:
        centred = v - v.mean(-1, keepdim=True)
        y = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
    y = y * weight.float()
    if norm_bias is not None:
        y = y + norm_bias.float()
    return y.to(residual.dtype), new_residual
