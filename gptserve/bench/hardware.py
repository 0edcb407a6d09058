"""What the machine can do, measured in the same run as a benchmark: copy bandwidth and matmul rate,
and the bytes one decode step must read, which together give the roofline for decoding."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from gptserve.layers.quantized_linear import Int4Linear, Int8Linear


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of `fn()`: CUDA events on a GPU (no host-side gaps counted), host clock elsewhere."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            start_s = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start_s)
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 10) -> float:
    """Bytes/s moved by a device-to-device copy (read + write counted), median of `repeats`.
    The buffers (1 GiB on a GPU, 256 MiB elsewhere) are far larger than any cache."""
    nbytes = nbytes or ((1 << 30) if device.type == "cuda" else 256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    seconds = _median_seconds(lambda: dst.copy_(src), device, repeats)
    return 2 * nbytes / seconds


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 5) -> float:
    """FLOP/s of a square matmul in `dtype`, median of `repeats`."""
    n = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    _sync(device)
    return 2 * n**3 / _median_seconds(lambda: a @ b, device, repeats)


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
