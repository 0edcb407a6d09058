"""The Triton decode-attention kernel with a sliding window (Mistral) against its plain-PyTorch reference,
and the reference against dense attention over the window's last tokens, on fresh random inputs; a
half-precision paged step on CUDA (FlashAttention's windowed varlen prefill and the kernel) against dense
attention under the window's mask (GPU only). Contexts reach past the window, so ignoring it fails."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

WINDOW = 24


def _inputs(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, device: str, dtype):
    num_blocks, max_blocks = 32, 8
    lens = torch.tensor([0, 1, WINDOW, WINDOW + 1, 5 * block_size - 3, max_blocks * block_size])
    cache = (4 * torch.randn(2 * num_kv_heads, num_blocks, block_size, head_dim, device=device)).to(dtype)
    tables = torch.stack([torch.randperm(num_blocks)[:max_blocks] for _ in range(len(lens))]).to(device)
    q = (4 * torch.randn(len(lens), num_heads, head_dim, device=device)).to(dtype)
    return q, cache, tables, lens


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_sliding_window_matches_reference(splits, dtype):
    from gptserve.kernels.paged_attention import (
        arrival_counters,
        paged_attention_decode,
        paged_attention_decode_reference,
    )

    torch.manual_seed(torch.randint(0, 2**31, ()).item())
    q, cache, tables, lens = _inputs(8, 4, 64, 16, "cuda", dtype)
    scale = 64**-0.5
    ref = paged_attention_decode_reference(q, cache, tables, lens, scale, sliding_window=WINDOW)
    whole = paged_attention_decode_reference(q, cache, tables, lens, scale)
    assert (ref.float() - whole.float()).abs().max() > 1e-2
    for b, n in enumerate(lens.tolist()):  # the reference is dense attention over the last WINDOW tokens
        if n == 0:
            continue
        ctx = cache[:, tables[b]].reshape(8, -1, 64)[:, max(n - WINDOW, 0) : n].float()
        k, v = ctx[:4].repeat_interleave(2, dim=0), ctx[4:].repeat_interleave(2, dim=0)
        probs = torch.einsum("hd,hnd->hn", q[b].float() * scale, k).softmax(dim=-1)
        assert (torch.einsum("hn,hnd->hd", probs, v) - ref[b].float()).abs().max() < 1e-2
    out = paged_attention_decode(
        q, cache, tables, lens.to("cuda", torch.int32), scale, splits=splits,
        arrivals=arrival_counters(q.device), sliding_window=WINDOW,
    )  # fmt: skip
    error = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert error < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_paged_step_keeps_to_the_window(dtype):
    from tests.layers.test_attention_sliding_window import windowed_paged_step

    out, expected, whole = windowed_paged_step(torch.device("cuda"), dtype)
    assert (out - expected).abs().max() < 5e-2 * expected.abs().max()
    assert (out - whole).abs().max() > 1e-1
