"""Normalisation layers. RMSNorm is ours (Llama); LayerNorm models use `torch.nn.LayerNorm` directly."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """x / rms(x) * weight, with the statistics in float32 and the scale applied in the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size))  # filled by load_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        # Round to the input dtype before scaling, as the Hugging Face reference does.
        return self.weight * x.to(dtype)
