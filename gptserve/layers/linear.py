"""The interface every linear layer of the models shares, the dense layer, and building layers without init.

A model's linear layer may be dense (`Linear`), tuned to run Triton kernels (`TunedLinear`), weight-only
quantized (`Int8Linear`, `Int4Linear`), or a row-parallel slice that reduces over the ranks
(`RowParallelLinear`, `ReducedLinear`). Each is a `LinearLayer`: called, it returns x @ W^T + b, and it
also hands out its `bias` and its `product(x)` without the bias, so that the fused epilogues of
`gptserve.layers.fused` add the bias in the kernel after the GEMM (with an activation, or with the residual
add) by asking the layer, whichever kind it is. `activated(x, activation)` lets a layer whose own kernel
applies bias and activation in its epilogue do so.
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

M = TypeVar("M", bound=nn.Module)


class LinearLayer(nn.Module):
    """y = x @ W^T + b, offering its bias and the product without it to a fused epilogue."""

    bias: torch.Tensor | None

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T without the bias: summed over the ranks where the layer reduces, this rank's partial
        product where its reduction is deferred (the caller then reduces and adds the bias once)."""
        raise NotImplementedError

    def activated(self, x: torch.Tensor, activation: str) -> torch.Tensor | None:
        """activation(self(x)) from the product's own kernel, where one serves this many rows; else None
        and the caller adds bias and activation after `product`."""
        return None


class Linear(nn.Linear, LinearLayer):
    """The dense layer: `nn.Linear`, whose product leaves the bias out."""

    def product(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def uninitialized(module_cls: type[M], *args, **kwargs) -> M:
    """`module_cls(*args, **kwargs)` on the default device, parameters allocated but not initialised (the
    checkpoint fills them)."""
    device = torch.get_default_device()
    with torch.device("meta"):
        module = module_cls(*args, **kwargs)
    return module.to_empty(device=device)
