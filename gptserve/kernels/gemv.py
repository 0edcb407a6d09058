"""One-row matrix product on the GPU (a lone sequence's decode step): y = x @ w^T (+ bias), x [1, K].

A one-row product reads the whole weight to do two flops per weight element, so its speed is the rate at
which the weight streams from memory. Each program reduces BLOCK_N weight rows against the activation
row in BLOCK_K-wide slices, keeping a [BLOCK_N, BLOCK_K] float32 accumulator and summing it once at the
end. The tile divides the weight exactly (the launch checks), so the loads carry no masks and compile to
full-width vector loads, and the inner dimension is never split: there is no second kernel adding
partial sums, as cuBLAS's split-K GEMV has. The bias and an MLP's activation are applied before the one
rounding, so a decode step's fc_in needs no bias + activation kernel after it. With 4-row, 2048-wide
tiles this reads GPT-J-6B's weights at 0.79-0.92x of cuBLAS's time on an H100 (2.9-3.1 TB/s). The tile
is a `MatmulConfig` with `block_m == 1`, so `gptserve tune` times it beside the tiled Triton product and
cuBLAS.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gptserve.kernels.bias_activation import KERNEL_ACTIVATIONS, activate
from gptserve.kernels.matmul_configs import MatmulConfig, default_gemv_config


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    K,
    stride_wn,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    w_tile = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + k0 + rk).to(tl.float32)
        w = tl.load(w_tile + k0).to(tl.float32)
        acc += w * x[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn).to(tl.float32)
    tl.store(out_ptr + rn, activate(y, ACTIVATION).to(out_ptr.dtype.element_ty))


def gemv_fits(weight: torch.Tensor, config: MatmulConfig) -> bool:
    """Whether `config`'s tile divides `weight` [N, K] exactly and its rows are contiguous."""
    n, k = weight.shape
    return (
        config.block_m == 1 and n % config.block_n == 0 and k % config.block_k == 0 and weight.stride(-1) == 1
    )


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: MatmulConfig | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """activation(x [1, K] @ weight [N, K]^T (+ bias [N])) -> [1, N] in x's dtype, the activation (one
    of `KERNEL_ACTIVATIONS`, or none) applied in float32 before the one rounding. `config` (a
    `block_m == 1` tile) defaults to `default_gemv_config`; a tile that does not divide the weight is
    refused."""
    n, k = weight.shape
    config = config or default_gemv_config(n, k)
    if x.shape != (1, k):
        raise ValueError(f"gemv takes one row of {k}, got {tuple(x.shape)}")
    if config is None or not gemv_fits(weight, config):
        raise ValueError(f"no GEMV tile {config} divides the weight {tuple(weight.shape)}")
    x = x.contiguous()
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    _gemv_kernel[(n // config.block_n,)](
        x,
        weight,
        x if bias is None else bias,
        out,
        k,
        weight.stride(0),
        HAS_BIAS=bias is not None,
        ACTIVATION=-1 if activation is None else KERNEL_ACTIVATIONS[activation],
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out
