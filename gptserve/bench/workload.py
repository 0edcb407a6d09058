"""Benchmark workloads: fixed random prompts (as token ids, so every engine sees the same input) and
timing summaries."""

from __future__ import annotations

import statistics

import torch


def random_prompts(count: int, min_len: int, max_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """`count` prompts of token ids with lengths uniform in [min_len, max_len]; ids avoid the first 256
    entries, where special tokens usually live."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (count,), generator=g).tolist()
    low = min(256, vocab_size // 2)
    return [torch.randint(low, vocab_size, (n,), generator=g).tolist() for n in lengths]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
