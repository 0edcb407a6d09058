"""Grouped mixture-of-experts GEMMs in Triton: every routed (token, choice) pair's expert product in one
launch per projection.

The pairs come sorted by expert and padded to BLOCK_M (`gptserve.kernels.moe_align`); the grid is
(blocks of pairs) x (N tiles), and program (m, n) multiplies its BLOCK_M pairs' input rows by a BLOCK_N
slice of the one expert its block belongs to, accumulating in float32. `fused_moe` runs it twice: the
stacked gate|up weights on each pair's token row, the activation-and-multiply in PyTorch, then the down
weights on each pair's intermediate row with the routing weight applied in the epilogue and the product
kept in float32; the top_k products of a token are summed and rounded once. Launch sizes depend only on
the token count, so a captured CUDA graph can replay it. `fused_moe_reference` is the plain-PyTorch form.

`FusedMoE` (gptserve.layers.moe) does not call this kernel yet: it is wired in once its GPU test
(tests/kernels/test_fused_moe.py) has passed on a device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from gptserve.kernels.moe_align import moe_align


@triton.jit
def _grouped_moe_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    weights_ptr,
    sorted_pairs_ptr,
    block_experts_ptr,
    num_padded_ptr,
    N,
    K,
    num_pairs,
    stride_am,
    stride_be,
    stride_bn,
    stride_cm,
    ROWS_PER_TOKEN: tl.constexpr,  # top_k when A holds one row per token, 1 when one row per pair
    MUL_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    pairs = tl.load(sorted_pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs < num_pairs
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    rows = (pairs // ROWS_PER_TOKEN).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + rows[:, None] * stride_am
    b_cols = b_ptr + expert * stride_be + rn.to(tl.int64)[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        a = tl.load(a_rows + k[None, :], mask=valid[:, None] & (k[None, :] < K), other=0.0)
        b = tl.load(b_cols + k[:, None], mask=(rn[None, :] < N) & (k[:, None] < K), other=0.0)
        acc = tl.dot(a, b.to(a.dtype), acc)
    if MUL_WEIGHT:
        acc *= tl.load(weights_ptr + pairs, mask=valid, other=0.0).to(tl.float32)[:, None]
    c = c_ptr + pairs.to(tl.int64)[:, None] * stride_cm + rn[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & (rn[None, :] < N))


def _block_m(num_pairs: int) -> int:
    return 16 if num_pairs <= 64 else 64


def _grouped_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    weights: torch.Tensor | None,
    alignment: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    rows_per_token: int,
    block_m: int,
) -> None:
    sorted_pairs, block_experts, num_padded = alignment
    n, k = b.shape[1], b.shape[2]
    block_n, block_k = 64, 32
    grid = (block_experts.numel(), triton.cdiv(n, block_n))
    _grouped_moe_kernel[grid](
        a,
        b,
        out,
        weights if weights is not None else out,
        sorted_pairs,
        block_experts,
        num_padded,
        n,
        k,
        out.shape[0],
        a.stride(0),
        b.stride(0),
        b.stride(1),
        out.stride(0),
        ROWS_PER_TOKEN=rows_per_token,
        MUL_WEIGHT=weights is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=4,
    )


def fused_moe(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    act_and_mul: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """sum_k weights[t, k] * down[e] @ act_and_mul(gate_up[e] @ x[t]) with e = ids[t, k]; x [T, hidden]
    contiguous, gate_up [E, 2 * inner, hidden], down [E, hidden, inner], weights [T, top_k] float32."""
    x = x.contiguous()
    num_tokens, top_k = ids.shape
    num_pairs = num_tokens * top_k
    block_m = _block_m(num_pairs)
    alignment = moe_align(ids, gate_up.shape[0], block_m)
    gate_up_out = x.new_empty(num_pairs, gate_up.shape[1])
    _grouped_gemm(x, gate_up, gate_up_out, None, alignment, top_k, block_m)
    inner = act_and_mul(gate_up_out).contiguous()
    down_out = torch.empty(num_pairs, down.shape[1], dtype=torch.float32, device=x.device)
    _grouped_gemm(inner, down, down_out, weights.reshape(-1).float().contiguous(), alignment, 1, block_m)
    return down_out.view(num_tokens, top_k, -1).sum(dim=1).to(x.dtype)


def fused_moe_reference(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    act_and_mul: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """`fused_moe` in plain PyTorch, pair by pair: each product in float32, summed, rounded once."""
    out = torch.zeros(x.shape[0], down.shape[1], dtype=torch.float32, device=x.device)
    for t in range(ids.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            y = F.linear(act_and_mul(F.linear(x[t : t + 1], gate_up[e])), down[e])
            out[t] += weights[t, k].float() * y[0].float()
    return out.to(x.dtype)
