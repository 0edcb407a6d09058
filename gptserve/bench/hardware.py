"""What the machine can do, measured in the same run as a benchmark: copy bandwidth and matmul rate,
and the bytes one decode step must read, which together give the roofline for decoding."""

from __future__ import annotations

import time

import torch
from torch import nn

from gptserve.layers.quantized_linear import Int4Linear, Int8Linear


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int = 256 << 20, repeats: int = 10) -> float:
    """Bytes/s moved by a device-to-device copy (read + write counted), median of `repeats`."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return 2 * nbytes / times[len(times) // 2]


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 5) -> float:
    """FLOP/s of a square matmul in `dtype`, median of `repeats`."""
    n = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return 2 * n**3 / times[len(times) // 2]


def decode_weight_bytes(model: nn.Module) -> int:
    """Bytes of weights one single-sequence decode step reads: every projection and the head (in the
    compact form it runs in), norms and biases; embedding tables only contribute one row, so not counted."""
    total = 0
    for module in model.modules():
        if isinstance(module, Int4Linear):
            total += module.packed.numel() * module.packed.element_size()
            total += module.scales_and_zeros.numel() * module.scales_and_zeros.element_size()
        elif isinstance(module, Int8Linear):
            total += module.weight.numel() + module.scale.numel() * module.scale.element_size()
        elif isinstance(module, nn.Embedding):
            continue
        else:
            for p in module.parameters(recurse=False):
                total += p.numel() * p.element_size()
            continue
        if module.bias is not None:
            total += module.bias.numel() * module.bias.element_size()
    return total
