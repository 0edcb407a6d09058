"""Normalisation layers. RMSNorm is ours (Llama); LayerNorm models use `torch.nn.LayerNorm` directly."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x / rms(x) * weight, with the statistics in float32 and the scale applied in the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size))  # filled by load_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The normalisation runs in float32 (one fused call) and rounds to the input dtype before the
        # weight is applied, as the Hugging Face reference does, so results match it bit for bit.
        normed = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return normed.to(x.dtype) * self.weight
