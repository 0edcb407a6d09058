"""A tiled Triton matrix product y = x @ w^T for weights in the activation dtype or int8 (with one scale
per output channel), with an optional bias, and split-K for few rows.

One program computes a BLOCK_M x BLOCK_N tile of y over one slice of the inner dimension. With SPLIT_K > 1
the slices' float32 partial sums go to a [SPLIT_K, M, N] buffer and a second kernel adds them, applies the
scale and bias and rounds once: a decode step's few rows then spread the weight reads over SPLIT_K times
more programs. This is the candidate `gptserve tune` times against cuBLAS for each GEMM shape (launch
configurations in `gptserve.kernels.matmul_configs`), and the tiled path of the int8 weight-only product.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gptserve.kernels.matmul_configs import MatmulConfig


@triton.jit
def matmul_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    M_BUCKET,  # autotuning key only
    stride_xm,
    stride_wn,
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    PARTIAL: tl.constexpr,  # write float32 partial sums [SPLIT_K, M, N] instead of the output
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    k_span = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k_start = pid_k * k_span
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + rn.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_start + k_span, BLOCK_K):
        k = k0 + rk
        x = tl.load(x_rows + k[None, :], mask=(rm[:, None] < M) & (k[None, :] < K), other=0.0)
        w = tl.load(w_cols + k[:, None], mask=(rn[None, :] < N) & (k[:, None] < K), other=0)
        acc = tl.dot(x, w.to(x.dtype), acc)
    out_mask = (rm[:, None] < M) & (rn[None, :] < N)
    if PARTIAL:
        part = out_ptr + (pid_k * M + rm.to(tl.int64))[:, None] * N + rn[None, :]
        tl.store(part, acc, out_mask)
    else:
        if HAS_SCALE:
            acc *= tl.load(scale_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        y = out_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
        tl.store(y, acc.to(out_ptr.dtype.element_ty), out_mask)


@triton.jit
def _sum_splits_kernel(
    partial_ptr,
    scale_ptr,
    bias_ptr,
    out_ptr,
    numel,
    N,
    splits,
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(splits):
        acc += tl.load(partial_ptr + s * numel + offsets, mask=mask, other=0.0)
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + offsets % N, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offsets % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


def sum_splits(
    partial: torch.Tensor,
    splits: int,
    scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """out [M, N] = (sum of partial[:splits]) (* scale) (+ bias), rounded once to `dtype`."""
    _, m, n = partial.shape
    out = torch.empty((m, n), dtype=dtype, device=partial.device)
    numel, block = m * n, 1024
    if numel:
        _sum_splits_kernel[(triton.cdiv(numel, block),)](
            partial,
            partial if scale is None else scale,
            partial if bias is None else bias,
            out,
            numel,
            n,
            splits,
            HAS_SCALE=scale is not None,
            HAS_BIAS=bias is not None,
            BLOCK=block,
            num_warps=4,
        )
    return out


def matmul(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: MatmulConfig
) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T (+ bias [N]) -> [M, N] in x's dtype, with the launch `config` (a
    `block_m == 1` configuration runs the one-row GEMV kernel)."""
    if config.block_m == 1:
        from gptserve.kernels.gemv import gemv

        return gemv(x, weight, bias, config)
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    n = weight.shape[0]
    grid = (triton.cdiv(n, config.block_n), config.split_k, triton.cdiv(m, config.block_m))
    meta = dict(
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        SPLIT_K=config.split_k,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    partial = config.split_k > 1
    if partial:
        out = torch.empty((config.split_k, m, n), dtype=torch.float32, device=x.device)
    else:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m:
        matmul_kernel[grid](
            x,
            weight,
            x,  # no scale
            x if bias is None else bias,
            out,
            m,
            n,
            k,
            0,
            x.stride(0),
            weight.stride(0),
            HAS_SCALE=False,
            HAS_BIAS=bias is not None,
            PARTIAL=partial,
            **meta,
        )
    return sum_splits(out, config.split_k, None, bias, x.dtype) if partial else out


def matmul_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Plain PyTorch: the product in float32, rounded once."""
    y = x.float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
