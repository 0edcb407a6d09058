"""The Triton decode-attention and KV-write kernels against their plain-PyTorch references, on fresh
random inputs (GPU only); a split context combined by a second kernel or by the last split to finish
(whose counters are back at zero after every call, replayed from a CUDA graph too)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("counted", [False, True], ids=["combine-kernel", "last-split-combines"])
@pytest.mark.parametrize("splits", [None, 1, 4, 16])
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,block_size,dtype",
    [
        (16, 16, 256, 16, torch.float16),  # GPT-J-6B
        (9, 3, 64, 16, torch.bfloat16),  # SmolLM2-style GQA
        (4, 2, 16, 8, torch.float32),
        (12, 12, 80, 32, torch.float16),  # head_dim not a power of two
    ],
)
def test_paged_decode_matches_reference(
    num_heads, num_kv_heads, head_dim, block_size, dtype, splits, counted
):
    from gptserve.kernels.paged_attention import (
        arrival_counters,
        paged_attention_decode,
        paged_attention_decode_reference,
    )

    torch.manual_seed(torch.randint(0, 2**31, ()).item())
    device = torch.device("cuda")
    num_blocks, max_blocks = 64, 20
    lens = torch.tensor([1, block_size, block_size + 1, 7 * block_size - 3, max_blocks * block_size, 0])
    batch = len(lens)
    cache = torch.randn(2 * num_kv_heads, num_blocks, block_size, head_dim, device=device).to(dtype)
    tables = torch.stack([torch.randperm(num_blocks)[:max_blocks] for _ in range(batch)]).to(device)
    q = torch.randn(batch, num_heads, head_dim, device=device).to(dtype)
    scale = head_dim**-0.5
    arrivals = arrival_counters(device) if counted else None
    ref = paged_attention_decode_reference(q, cache, tables, lens, scale)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for _ in range(2):  # the counters are reusable
        out = torch.full_like(q, float("nan"))
        lens_gpu = lens.to(device, torch.int32)
        paged_attention_decode(q, cache, tables, lens_gpu, scale, out=out, splits=splits, arrivals=arrivals)
        assert not out.isnan().any()
        assert _relative_error(out, ref) < tol
        assert (out[lens == 0] == 0).all()
        assert arrivals is None or (arrivals == 0).all()


def test_last_split_combines_in_graph_replays():
    """One captured call replayed with fresh queries and contexts: each replay's output is the reference's,
    and the counters are zero after each."""
    from gptserve.kernels.paged_attention import (
        arrival_counters,
        num_splits,
        paged_attention_decode,
        paged_attention_decode_reference,
    )

    torch.manual_seed(torch.randint(0, 2**31, ()).item())
    device = torch.device("cuda")
    heads, dim, block_size, num_blocks, max_blocks, batch = 16, 256, 16, 128, 24, 2
    assert num_splits(batch, heads, device) > 1
    cache = torch.randn(2 * heads, num_blocks, block_size, dim, device=device).half()
    tables = torch.stack([torch.randperm(num_blocks)[:max_blocks] for _ in range(batch)]).to(device).int()
    q = torch.empty(batch, heads, dim, device=device, dtype=torch.float16)
    lens = torch.zeros(batch, device=device, dtype=torch.int32)
    out = torch.empty_like(q)
    arrivals = arrival_counters(device)

    def call():
        paged_attention_decode(q, cache, tables, lens, dim**-0.5, out=out, arrivals=arrivals)

    q.normal_()
    lens.fill_(5)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for _ in range(30):
        q.copy_(torch.randn_like(q))
        lens.copy_(torch.randint(1, max_blocks * block_size + 1, (batch,), device=device))
        out.fill_(float("nan"))
        graph.replay()
        ref = paged_attention_decode_reference(q, cache, tables, lens.cpu(), dim**-0.5)
        assert _relative_error(out, ref) < 1e-2
        assert (arrivals == 0).all()


@pytest.mark.parametrize("head_dim,dtype", [(256, torch.float16), (64, torch.bfloat16), (80, torch.float32)])
def test_write_kv_matches_reference(head_dim, dtype):
    from gptserve.kernels.kv_cache_write import write_kv, write_kv_reference

    device = torch.device("cuda")
    heads, slots, tokens = 6, 200, 9
    cache = torch.randn(heads, slots, head_dim, device=device).to(dtype)
    expected = cache.clone()
    # K/V as the fused projection leaves them: a strided view of a wider row.
    packed = torch.randn(tokens, (heads + 3) * head_dim, device=device).to(dtype)
    kv = packed[:, 3 * head_dim :].view(tokens, heads, head_dim)
    slot_mapping = torch.randperm(slots, device=device)[:tokens]
    slot_mapping[[2, 5]] = -1  # padding rows
    write_kv(kv, cache, slot_mapping)
    write_kv_reference(kv, expected, slot_mapping)
    assert torch.equal(cache, expected)


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="fp8 needs sm89+"
)
@pytest.mark.parametrize("q_dtype", [torch.float16, torch.bfloat16])
def test_paged_decode_reads_an_fp8_cache(q_dtype):
    """An fp8 cache is read back into float32 inside the kernel: the same result as attending over the
    cache converted to the query's dtype first."""
    from gptserve.kernels.paged_attention import paged_attention_decode, paged_attention_decode_reference

    torch.manual_seed(torch.randint(0, 2**31, ()).item())
    device = torch.device("cuda")
    num_blocks, block_size, max_blocks, heads, head_dim = 32, 16, 8, 4, 128
    lens = torch.tensor([1, 17, max_blocks * block_size])
    cache = torch.randn(2 * heads, num_blocks, block_size, head_dim, device=device).to(torch.float8_e4m3fn)
    tables = torch.stack([torch.randperm(num_blocks)[:max_blocks] for _ in range(len(lens))]).to(device)
    q = torch.randn(len(lens), heads, head_dim, device=device).to(q_dtype)
    out = paged_attention_decode(q, cache, tables, lens.to(device, torch.int32), head_dim**-0.5)
    ref = paged_attention_decode_reference(q, cache.to(q_dtype), tables, lens, head_dim**-0.5)
    assert _relative_error(out, ref) < 1e-2


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="fp8 needs sm89+"
)
def test_write_kv_into_an_fp8_cache():
    from gptserve.kernels.kv_cache_write import write_kv, write_kv_reference

    device = torch.device("cuda")
    heads, slots, tokens, head_dim = 4, 64, 7, 128
    cache = torch.zeros(heads, slots, head_dim, device=device, dtype=torch.float8_e4m3fn)
    kv = torch.randn(tokens, heads, head_dim, device=device).to(torch.bfloat16)
    slot_mapping = torch.randperm(slots, device=device)[:tokens]
    slot_mapping[3] = -1
    write_kv(kv, cache, slot_mapping)
    expected = torch.zeros(heads, slots, head_dim, device=device, dtype=torch.bfloat16)
    write_kv_reference(kv, expected, slot_mapping)
    rounded = expected.to(torch.float8_e4m3fn).to(torch.bfloat16)
    torch.testing.assert_close(cache.to(torch.bfloat16), rounded, rtol=0.07, atol=1e-3)
