"""Block epilogues that run as single kernels on a GPU: the residual add with the norm that follows it, a
GEMM's bias with its activation, and a bias left out of a GEMM for the residual add to carry. The GEMM
epilogues ask the layer (`LinearLayer`) for its product without the bias and for the bias, whichever kind
of linear layer it is.

Off CUDA each falls back to the plain PyTorch ops in the order the models always used, so CPU results are
exactly those of the unfused modules. On CUDA the fused kernels compute in float32 and round once, which
may differ from the unfused half-precision ops in the last bit.
"""

from __future__ import annotations

import torch
from torch import nn

from gptserve.layers.activation import Activation
from gptserve.layers.linear import LinearLayer
from gptserve.layers.norms import RMSNorm
from gptserve.parallel import parallel_state


def add_norm(
    norm: nn.LayerNorm | RMSNorm,
    residual: torch.Tensor,
    *deltas: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(r), r) with r = (sum of deltas (+ bias)) + residual; one or two deltas."""
    if residual.is_cuda and len(deltas) <= 2:
        from gptserve.kernels.residual_norm import residual_norm

        rms = isinstance(norm, RMSNorm)
        norm_bias = None if rms else norm.bias
        delta2 = deltas[1] if len(deltas) == 2 else None
        return residual_norm(residual, deltas[0], norm.weight, norm_bias, norm.eps, rms, delta2, bias)
    total = deltas[0]
    for delta in deltas[1:]:
        total = total + delta
    if bias is not None:
        total = total + bias
    residual = total + residual
    return norm(residual), residual


def add_partials_norm(
    norm: nn.LayerNorm,
    residual: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`add_norm` for a parallel-residual block (GPT-J, GPT-NeoX), whose attention and MLP outputs `a`
    and `b` are this rank's partial sums: under tensor parallelism they are added and all-reduced once;
    in a world of one both go to the fused kernel."""
    if parallel_state.world_size() > 1:
        return add_norm(norm, residual, parallel_state.all_reduce(a + b), bias=bias)
    return add_norm(norm, residual, a, b, bias=bias)


def run_blocks(
    blocks: nn.ModuleList, input_norm: str, final_norm: nn.Module, x: torch.Tensor, *args: object
) -> torch.Tensor:
    """Pre-norm blocks whose forward takes (*args, h, x, next_norm) with h = its input norm of x and
    returns (next_norm(x'), x'): each block's residual add is fused with the next block's input norm
    (the attribute `input_norm`), the last one's with `final_norm`. Returns final_norm of the output."""
    norms = [getattr(block, input_norm) for block in blocks]
    h = norms[0](x)
    for block, next_norm in zip(blocks, norms[1:] + [final_norm]):
        h, x = block(*args, h, x, next_norm)
    return h


def bias_in_epilogue(*layers: nn.Module) -> None:
    """Mark layers whose bias the fused kernels add on CUDA (`linear_activation`, `linear_deferring_bias`),
    so `gptserve tune` times their GEMMs without it, as they run."""
    for layer in layers:
        layer.bias_in_epilogue = True


def linear_activation(linear: LinearLayer, activation: Activation, x: torch.Tensor) -> torch.Tensor:
    """activation(linear(x)); on CUDA the layer's bias and the activation are one kernel, or part of the
    product's where the layer's own kernel (the one-row GEMV) serves it."""
    if x.is_cuda and linear.bias is not None:
        from gptserve.kernels.bias_activation import KERNEL_ACTIVATIONS, bias_activation_

        if activation.name in KERNEL_ACTIVATIONS:
            y = linear.activated(x, activation.name)
            if y is not None:
                return y
            return bias_activation_(linear.product(x), linear.bias, activation.name)
    return activation(linear(x))


def linear_deferring_bias(linear: LinearLayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(y, bias) where y + bias = linear(x): on CUDA the layer's bias is left out of the product and
    returned for `add_norm` to add (after the reduction, where the layer reduces); elsewhere the bias is
    inside y and None is returned."""
    if x.is_cuda and linear.bias is not None:
        return linear.product(x), linear.bias
    return linear(x), None
