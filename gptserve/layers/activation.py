"""Activation functions by their Hugging Face config names, and the gated form used by SwiGLU MLPs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gptserve.errors import ModelLoadError


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    # "gelu_new" and "gelu_fast" are the tanh approximation written out in Python by transformers; the fused
    # op computes the same formula in one pass and agrees to within float32 rounding.
    return F.gelu(x, approximate="tanh")


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


class Activation(nn.Module):
    """An elementwise activation chosen by name."""

    def __init__(self, name: str):
        super().__init__()
        if name not in ACTIVATIONS:
            raise ModelLoadError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
        self.name = name
        self.fn = ACTIVATIONS[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


class ActAndMul(Activation):
    """Gated MLP on a fused gate|up projection: act(x[..., :d]) * x[..., d:] -> [..., d]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return self.fn(gate) * up


class SiluAndMul(ActAndMul):
    """SwiGLU: silu(gate) * up."""

    def __init__(self):
        super().__init__("silu")
