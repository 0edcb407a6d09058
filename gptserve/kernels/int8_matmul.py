"""Weight-only int8 matrix product on the GPU: y = x @ (w_int8 * scale)^T, one scale per output channel.

The int8 weights are read once and widened to the activation dtype in registers, so a decode step reads
half the bytes of fp16 weights. One row (a single sequence's decode step) takes a GEMV kernel: each
program reduces BLOCK_N weight rows against the activation row, with no tensor-core tile to fill. More
rows take the tiled kernel of `gptserve.kernels.matmul`: each program computes a BLOCK_M x BLOCK_N tile
over one slice of the inner dimension; for the few rows of a batched decode step the inner dimension is
split (SPLIT_K) so that enough programs run to saturate memory bandwidth, and the float32 partial sums
are added, scaled and rounded by one more kernel. Tile shapes are chosen by Triton's autotuner per weight
shape and row-count bucket.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gptserve.kernels.matmul import matmul_kernel, sum_splits
from gptserve.kernels.matmul_configs import LARGE_TILES

MAX_SPLIT_K = 8
SMALL_M = 16  # at most this many rows take the split-K decode configurations


def _configs(small: bool) -> list[triton.Config]:
    if small:  # a decode step: few rows, bound by reading the weights
        return [
            triton.Config(
                {"BLOCK_M": 16, "BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": s}, num_warps=4, num_stages=st
            )
            for n in (64, 128)
            for k in (128, 256)
            for s in (1, 2, 4, MAX_SPLIT_K)
            for st in (4,)
        ]
    return [  # prefill and large batches: bound by arithmetic
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": 64, "SPLIT_K": 1}, num_warps=w, num_stages=4)
        for m, n, w in LARGE_TILES
    ]


@triton.jit
def _int8_gemv_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    out_ptr,
    N,
    K,
    stride_wn,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        x = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
        w = tl.load(w_rows + k[None, :], mask=(rn[:, None] < N) & (k[None, :] < K), other=0)
        acc += w.to(tl.float32) * x[None, :]
    scale = tl.load(scale_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    y = tl.sum(acc, axis=1) * scale
    tl.store(out_ptr + rn, y.to(out_ptr.dtype.element_ty), mask=rn < N)


def _quick_bench(fn, quantiles=None, **_):
    """The autotuner's timer, shortened: a model has a few dozen (shape, bucket) keys to tune at start-up."""
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


_KEY = ["M_BUCKET", "N", "K"]
_small = triton.autotune(configs=_configs(True), key=_KEY, do_bench=_quick_bench)(matmul_kernel)
_large = triton.autotune(configs=_configs(False), key=_KEY, do_bench=_quick_bench)(matmul_kernel)
_gemv = triton.autotune(
    configs=[
        triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w)
        for n in (8, 16, 32)
        for k in (256, 512, 1024)
        for w in (4, 8)
        if n * k <= 16384
    ],
    key=["N", "K"],
    do_bench=_quick_bench,
)(_int8_gemv_kernel)


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] fp16/bf16, weight [N, K] int8, scale [N] -> [M, N] in x's dtype."""
    m, k = x.shape
    n = weight.shape[0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    if m == 1:
        out = torch.empty((1, n), dtype=x.dtype, device=x.device)
        _gemv[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](x, weight, scale, out, n, k, weight.stride(0))
        return out
    bucket = triton.next_power_of_2(m) if m <= 256 else 512

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"], triton.cdiv(m, meta["BLOCK_M"]))

    args = (m, n, k, bucket, x.stride(0), weight.stride(0))
    if m > SMALL_M:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
        _large[grid](x, weight, scale, x, out, *args, HAS_SCALE=True, HAS_BIAS=False, PARTIAL=False)
        return out
    # The autotuner picks the split count, so the buffer holds the most splits any configuration uses
    # and the sum runs over the ones the chosen configuration wrote.
    partial = torch.empty((MAX_SPLIT_K, m, n), dtype=torch.float32, device=x.device)
    _small[grid](x, weight, scale, x, partial, *args, HAS_SCALE=True, HAS_BIAS=False, PARTIAL=True)
    return sum_splits(partial, _small.best_config.kwargs["SPLIT_K"], scale, None, x.dtype)


def int8_matmul_reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch: dequantize, then a dense product in float32."""
    return (x.float() @ (weight.float() * scale.float()[:, None]).t()).to(x.dtype)
