"""The int8 weight-only format the int8 kernels read (`gptserve.kernels.int8_matmul`): symmetric, one scale
per output channel, w = q * scale with q in [-127, 127].

Plain PyTorch, no Triton: the int8 layer quantizes into it at load (`Int8Linear.from_linear`) and
`gptserve convert --quantization int8` writes it, on any machine; both use this one function, so a
converted checkpoint quantizes back at load to exactly the values it stores.
"""

from __future__ import annotations

import torch


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [N, K] int8, contiguous; scale [N] in `weight`'s dtype) for a weight [N, K]."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-10)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
    return q, scale.to(weight.dtype)
