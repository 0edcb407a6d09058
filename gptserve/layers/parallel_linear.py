"""Megatron linear layers: column-parallel (output features split) and row-parallel (input features split).

A column-parallel layer needs no communication: its output stays split, one slice of heads or of the
MLP's intermediate features per rank, which is what the attention and activation that follow consume. The
row-parallel layer after them sums the ranks' partial products with one all-reduce and adds its bias once,
after the sum. So each transformer block costs two all-reduces (attention output, MLP output), except in
blocks with a parallel residual (GPT-J, GPT-NeoX): x + attn(..) + mlp(..) sums the two partial outputs
first and reduces once (`defer_reduction`), which halves the block's communication.

Both are built by functions that take the full sizes and return a dense `Linear` in a world of one,
so single-rank models are exactly what they were. Weight-only quantization swaps the GEMM of a
row-parallel layer and keeps the reduction around it (`RowParallelLinear.wrap_quantized`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gptserve.layers.linear import Linear, LinearLayer, uninitialized
from gptserve.parallel import parallel_state


def divide(size: int, what: str = "size") -> int:
    """`size` split over the tensor-parallel world; sizes are checked up front by `check_tensor_parallel`."""
    world = parallel_state.world_size()
    if size % world:
        raise ValueError(f"{what} {size} is not divisible by tensor_parallel_size {world}")
    return size // world


def column_parallel_linear(in_features: int, out_features: int, bias: bool = True) -> Linear:
    """This rank's [out_features / world, in_features] slice of a linear layer, output left split."""
    return uninitialized(Linear, in_features, divide(out_features, "output features"), bias=bias)


def row_parallel_linear(in_features: int, out_features: int, bias: bool = True) -> Linear:
    """This rank's [out_features, in_features / world] slice of a linear layer, its output summed over the
    ranks (a dense `Linear` in a world of one)."""
    local_in = divide(in_features, "input features")
    cls = Linear if parallel_state.world_size() == 1 else RowParallelLinear
    return uninitialized(cls, local_in, out_features, bias=bias)


def defer_reduction(*layers: nn.Module) -> None:
    """Make row-parallel `layers` return this rank's partial product (the bias on rank 0 only), for a
    caller that sums them with others and reduces once. No-op for dense layers (a world of one)."""
    for layer in layers:
        if isinstance(layer, RowParallelLinear | ReducedLinear):
            layer.reduce = False


class RowParallelLinear(Linear):
    """y = all_reduce(x_r @ W_r^T) + b: the partial products summed over the ranks, the bias added once.
    With `reduce` off, the partial product alone (rank 0 adds the bias): the caller reduces."""

    reduce = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.reduce:
            return F.linear(x, self.weight, self.bias if parallel_state.rank() == 0 else None)
        y = parallel_state.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias

    def product(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        return parallel_state.all_reduce(y) if self.reduce else y

    def wrap_quantized(self, quantized: LinearLayer) -> ReducedLinear:
        """Keep this layer's reduction around `quantized`, its weight-only form (which carries the bias)."""
        wrapped = ReducedLinear(quantized)
        wrapped.reduce = self.reduce
        return wrapped


class ReducedLinear(LinearLayer):
    """A quantized row-parallel GEMM: all_reduce(inner(x)) + bias, the bias taken out of `inner`; with
    `reduce` off, inner(x) (+ bias on rank 0) for the caller to reduce."""

    reduce = True

    def __init__(self, inner: LinearLayer):
        super().__init__()
        self.bias = inner.bias
        inner.bias = None
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.reduce:
            y = self.inner(x)
            return y if self.bias is None or parallel_state.rank() != 0 else y + self.bias
        y = parallel_state.all_reduce(self.inner(x))
        return y if self.bias is None else y + self.bias

    def product(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)  # the bias was taken out of `inner`
        return parallel_state.all_reduce(y) if self.reduce else y
