"""A GEMM's bias add fused with the activation that follows it, in place.

For a decode step's few rows cuBLAS cannot fold the bias into the GEMM (PyTorch then copies the bias into
the output first, one kernel), and the activation is another kernel. Here one pass adds the bias and
applies the activation in float32, rounding once: y = act(y + bias).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# Activation names (as `gptserve.layers.activation` knows them) -> the kernel's code for the formula.
KERNEL_ACTIVATIONS = {
    "gelu": 0,  # exact, with erf
    "gelu_new": 1,  # tanh approximation
    "gelu_fast": 1,
    "gelu_pytorch_tanh": 1,
    "relu": 2,
    "silu": 3,
    "swish": 3,
    "quick_gelu": 4,
}


@triton.jit
def activate(x, ACTIVATION: tl.constexpr):
    """The activation of code ACTIVATION (`KERNEL_ACTIVATIONS`) on float32 x; -1: none."""
    if ACTIVATION == 0:
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACTIVATION == 1:
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        x = x * (1.0 - 1.0 / (tl.exp(2.0 * inner) + 1.0))  # 0.5 * x * (1 + tanh(inner))
    elif ACTIVATION == 2:
        x = tl.maximum(x, 0.0)
    elif ACTIVATION == 3:
        x = x / (1.0 + tl.exp(-x))
    elif ACTIVATION == 4:
        x = x / (1.0 + tl.exp(-1.702 * x))
    return x


@triton.jit
def _bias_activation_kernel(y_ptr, bias_ptr, numel, width, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    y = tl.load(y_ptr + offsets, mask=mask, other=0.0)
    x = y.to(tl.float32) + tl.load(bias_ptr + offsets % width, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offsets, activate(x, ACTIVATION).to(y.dtype), mask=mask)


def bias_activation_(y: torch.Tensor, bias: torch.Tensor, activation: str) -> torch.Tensor:
    """y <- act(y + bias) for a contiguous y [..., width] and bias [width]; returns y."""
    if not y.is_contiguous():
        raise ValueError("bias_activation_ needs a contiguous output")
    numel = y.numel()
    if numel:
        block = 1024
        _bias_activation_kernel[(triton.cdiv(numel, block),)](
            y, bias, numel, y.shape[-1], ACTIVATION=KERNEL_ACTIVATIONS[activation], BLOCK=block, num_warps=4
        )
    return y


# `activate`'s formulas in plain PyTorch, by the kernel's code.
_REFERENCE_ACTIVATIONS: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    0: F.gelu,
    1: lambda x: F.gelu(x, approximate="tanh"),
    2: F.relu,
    3: F.silu,
    4: lambda x: x * torch.sigmoid(1.702 * x),
}


def bias_activation_reference(y: torch.Tensor, bias: torch.Tensor, activation: str) -> torch.Tensor:
    """`bias_activation_` in plain PyTorch (float32, rounded once), out of place."""
    formula = _REFERENCE_ACTIVATIONS[KERNEL_ACTIVATIONS[activation]]
    return formula(y.float() + bias.float()).to(y.dtype)
