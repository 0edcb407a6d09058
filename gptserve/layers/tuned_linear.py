"""A linear layer whose GEMMs of tuned row counts run the Triton configuration `gptserve tune` chose.

`gptserve tune` times the Triton matrix product (`gptserve.kernels.matmul`) against cuBLAS for every GEMM
shape and row count the model runs; where a configuration won, serving wraps the layer in `TunedLinear`,
which sends a call of exactly that many rows to the Triton kernel with that configuration and every other
call to cuBLAS, as the plain layer would. Decode steps run at the CUDA-graph batch sizes, which are the
row counts tuned, so the choice is made once per size, when the graph is captured.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class TunedLinear(nn.Module):
    """`inner` with some row counts served by Triton configurations ({rows: MatmulConfig})."""

    def __init__(self, inner: nn.Linear, configs: dict[int, Any]):
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
        """x @ W^T without the bias, for a caller that adds the bias in a fused kernel."""
        return self._gemm(x, None)

    def _gemm(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        config = self.configs.get(flat.shape[0])
        if config is None:
            return F.linear(x, self.inner.weight, bias)
        from gptserve.kernels.matmul import matmul

        return matmul(flat, self.inner.weight, bias, config).view(*x.shape[:-1], -1)

    def extra_repr(self) -> str:
        return f"Triton for rows {sorted(self.configs)}"


def apply_tuned_configs(net: nn.Module, picks: list[dict[str, Any]]) -> int:
    """Wrap each plain linear layer of `net` that has Triton picks ({"name", "n", "k", "rows",
    "triton_config"} from the tuning report) in a `TunedLinear`; returns how many layers were wrapped."""
    from gptserve.tuning.matmul_configs import MatmulConfig

    by_layer: dict[tuple[str, int, int], dict[int, MatmulConfig]] = {}
    for pick in picks:
        key = (pick["name"], pick["n"], pick["k"])
        by_layer.setdefault(key, {})[pick["rows"]] = MatmulConfig(**pick["triton_config"])
    wrapped = 0
    for parent in list(net.modules()):
        for attr, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            configs = by_layer.get((attr, child.out_features, child.in_features))
            if configs:
                setattr(parent, attr, TunedLinear(child, configs))
                wrapped += 1
    return wrapped
