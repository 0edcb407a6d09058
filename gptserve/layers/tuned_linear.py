"""A linear layer whose GEMMs of some row counts run a Triton kernel: the one-row GEMV by default on
CUDA, and the configurations `gptserve tune` chose.

A lone sequence's decode step multiplies one row by each weight; the Triton GEMV
(`gptserve.kernels.gemv`) streams the weight faster than cuBLAS's split-K GEMV, so on CUDA every fp16/bf16
linear layer whose weight its tile divides is wrapped in `TunedLinear` with that kernel for one row.
`gptserve tune` times the GEMV and the tiled Triton product (`gptserve.kernels.matmul`) against cuBLAS
for every GEMM shape and row count the model runs; its picks then replace those defaults, and a row
count it gave to cuBLAS or TunableOp goes to `F.linear`. Decode steps run at the CUDA-graph batch sizes,
which are the row counts tuned, so the choice is made once per size, when the graph is captured.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gptserve.kernels.matmul_configs import MatmulConfig, default_gemv_config
from gptserve.layers.linear import Linear, LinearLayer


class TunedLinear(LinearLayer):
    """`inner` with some row counts served by Triton configurations ({rows: MatmulConfig})."""

    def __init__(self, inner: Linear, configs: dict[int, MatmulConfig]):
        super().__init__()
        self.inner = inner
        self.configs = configs

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.inner.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._gemm(x, self.inner.bias)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        return self._gemm(x, None)

    def activated(self, x: torch.Tensor, activation: str) -> torch.Tensor | None:
        """activation(x @ W^T + b) from one GEMV kernel when the GEMV serves this many rows (the
        activation one of `KERNEL_ACTIVATIONS`); else None."""
        flat = x.reshape(-1, x.shape[-1])
        config = self.configs.get(flat.shape[0])
        if config is None or config.block_m != 1:
            return None
        from gptserve.kernels.gemv import gemv

        y = gemv(flat, self.inner.weight, self.inner.bias, config, activation)
        return y.view(*x.shape[:-1], -1)

    def _gemm(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        config = self.configs.get(flat.shape[0])
        if config is None:
            return F.linear(x, self.inner.weight, bias)
        from gptserve.kernels.matmul import matmul

        return matmul(flat, self.inner.weight, bias, config).view(*x.shape[:-1], -1)

    def extra_repr(self) -> str:
        return f"Triton for rows {sorted(self.configs)}"


def use_gemv_for_one_row(net: nn.Module) -> int:
    """Wrap each dense fp16/bf16 `Linear` of `net` whose weight a GEMV tile divides in a `TunedLinear`
    that sends one-row products to the Triton GEMV; returns how many layers were wrapped."""
    wrapped = 0
    for parent in list(net.modules()):
        for attr, child in list(parent.named_children()):
            if type(child) is not Linear or child.weight.dtype not in (torch.float16, torch.bfloat16):
                continue
            config = default_gemv_config(child.out_features, child.in_features)
            if config is not None and child.weight.is_contiguous():
                setattr(parent, attr, TunedLinear(child, {1: config}))
                wrapped += 1
    return wrapped


def apply_tuned_configs(net: nn.Module, gemms: list[dict[str, Any]]) -> int:
    """Serve the tuning report's choices ({"name", "n", "k", "rows", "served", "triton_config"} per
    GEMM): a Triton pick wraps the linear layers of that name and shape (or joins the configurations of
    one already wrapped); a row count served by cuBLAS or TunableOp drops any default Triton kernel for
    it. Returns how many layers serve Triton picks."""
    by_layer: dict[tuple[str, int, int], dict[int, MatmulConfig | None]] = {}
    for gemm in gemms:
        triton = gemm.get("served") == "triton" and gemm.get("triton_config")
        config = MatmulConfig(**gemm["triton_config"]) if triton else None
        by_layer.setdefault((gemm["name"], gemm["n"], gemm["k"]), {})[gemm["rows"]] = config
    serving = 0
    for parent in list(net.modules()):
        for attr, child in list(parent.named_children()):
            if type(child) is Linear:
                inner, configs = child, {}
            elif isinstance(child, TunedLinear):
                inner, configs = child.inner, dict(child.configs)
            else:
                continue
            choices = by_layer.get((attr, inner.out_features, inner.in_features), {})
            picked = False
            for rows, config in choices.items():
                if config is None:
                    configs.pop(rows, None)
                else:
                    configs[rows], picked = config, True
            serving += picked
            if configs:
                setattr(parent, attr, TunedLinear(inner, configs))
            elif child is not inner:
                setattr(parent, attr, inner)
    return serving
