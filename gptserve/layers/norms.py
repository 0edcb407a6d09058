"""Normalisation layers. RMSNorm is ours (Llama), GemmaRMSNorm Gemma's; LayerNorm models use
`torch.nn.LayerNorm` directly."""

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
        # Without a weight, F.rms_norm computes in float32 and rounds to the input dtype in one call; the
        # weight is applied after that rounding, as the Hugging Face reference does, so results match it
        # bit for bit (tests/models/test_rotary_norm_activation.py).
        return F.rms_norm(x, self.weight.shape, eps=self.eps) * self.weight


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: x / rms(x) * (1 + weight), all in float32, rounded to the input dtype once."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size))  # filled by load_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)
