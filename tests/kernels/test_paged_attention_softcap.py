"""The Triton decode-attention kernel with logit soft-capping (Gemma 2) against its plain-PyTorch reference
on fresh random inputs (GPU only); the cap is low enough to change the output."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


def _inputs(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, device: str, dtype):
    num_blocks, max_blocks = 32, 8
    lens = torch.tensor([1, block_size + 1, 5 * block_size - 3, max_blocks * block_size])
    cache = (4 * torch.randn(2 * num_kv_heads, num_blocks, block_size, head_dim, device=device)).to(dtype)
    tables = torch.stack([torch.randperm(num_blocks)[:max_blocks] for _ in range(len(lens))]).to(device)
    q = (4 * torch.randn(len(lens), num_heads, head_dim, device=device)).to(dtype)
    return q, cache, tables, lens


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_softcap_matches_reference(splits, dtype):
    from gptserve.kernels.paged_attention import (
        arrival_counters,
        paged_attention_decode,
        paged_attention_decode_reference,
    )

    torch.manual_seed(torch.randint(0, 2**31, ()).item())
    q, cache, tables, lens = _inputs(8, 4, 64, 16, "cuda", dtype)
    scale, softcap = 64**-0.5, 5.0
    ref = paged_attention_decode_reference(q, cache, tables, lens, scale, softcap=softcap)
    uncapped = paged_attention_decode_reference(q, cache, tables, lens, scale)
    assert (ref.float() - uncapped.float()).abs().max() > 1e-2
    out = paged_attention_decode(
        q, cache, tables, lens.to("cuda", torch.int32), scale, splits=splits,
        arrivals=arrival_counters(q.device), softcap=softcap,
    )  # fmt: skip
    error = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert error < (1e-5 if dtype == torch.float32 else 1e-2)
