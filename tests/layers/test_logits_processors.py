"""`apply_token_bitmask` (the grammar mask) against the plain reference it replaced: unpack every bit with
shifts, then a masked fill, on fresh random masks, row subsets in any order, vocabularies that are not a
multiple of 32, infinite logits and the dtypes the sampler may see."""

from __future__ import annotations

import pytest
import torch

from gptserve.layers.logits_processors import apply_token_bitmask


def reference(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    vocab = logits.shape[1]
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().view(bitmask.shape[0], -1)[:, :vocab]
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))


def random_case(num_rows: int, vocab: int, masked: int, seed: int, device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(num_rows, vocab, generator=g) * 4).to(dtype)
    logits[0, :3] = torch.tensor([float("inf"), float("-inf"), -0.0]).to(dtype)
    rows = torch.randperm(num_rows, generator=g)[:masked]
    words = (vocab + 31) // 32
    bitmask = torch.randint(-(2**31), 2**31 - 1, (masked, words), generator=g, dtype=torch.int32)
    bitmask[0] = 0  # nothing allowed
    if masked > 1:
        bitmask[1] = -1  # everything allowed
    return logits.to(device), rows.to(device), bitmask.to(device)


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("num_rows", "vocab", "masked"), [(1, 49152, 1), (5, 50257, 3), (8, 50400, 8), (3, 33, 2), (64, 512, 64)]
)
def test_same_values_as_the_reference(device, dtype, num_rows, vocab, masked):
    for seed in range(3):
        logits, rows, bitmask = random_case(num_rows, vocab, masked, seed, device, dtype)
        expected = logits.clone()
        reference(expected, rows, bitmask)
        apply_token_bitmask(logits, rows, bitmask)
        assert torch.equal(logits, expected)
        assert torch.equal(logits.signbit(), expected.signbit())  # -0.0 stays -0.0
