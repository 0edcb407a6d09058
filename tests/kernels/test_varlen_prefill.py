"""On a GPU in half precision, prefill chunks go through one FlashAttention varlen call: the same
result as plain softmax attention, for fresh prompts alone and for a step that mixes decodes, a chunk
after a cached prefix and a fresh prompt (GPU only)."""

from __future__ import annotations

import pytest
import torch

from gptserve.layers.attention import Attention, AttentionMetadata, PrefillChunk, attention_context
from tests.layers.test_attention import BLOCK, DIM, HEADS, KV_HEADS, NUM_BLOCKS, PagedSequences, reference

pytestmark = pytest.mark.gpu


def _on_cuda(attn: Attention, meta: AttentionMetadata) -> tuple[Attention, AttentionMetadata]:
    """The CPU-built cache and metadata, moved to the GPU."""
    gpu = Attention(HEADS, KV_HEADS, DIM)
    gpu.allocate_cache(NUM_BLOCKS, BLOCK, attn.kv_cache.dtype, torch.device("cuda"))
    gpu.kv_cache.copy_(attn.kv_cache)
    moved = AttentionMetadata(
        slot_mapping=meta.slot_mapping.cuda(),
        num_decode_tokens=meta.num_decode_tokens,
        decode_blocks=None if meta.decode_blocks is None else meta.decode_blocks.cuda(),
        decode_context_lens=meta.decode_context_lens,
        prefills=[
            PrefillChunk(c.query_start, c.query_len, c.context_len, c.context_slots.cuda())
            for c in meta.prefills
        ],
    )
    return gpu, moved


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mixed", [False, True], ids=["fresh-prompts", "decodes-prefix-and-fresh"])
def test_varlen_prefill_matches_reference(dtype, mixed):
    torch.manual_seed(torch.randint(0, 2**31, ()).item())
    if mixed:  # two decodes, 5 new tokens after a cached prefix of 6, a fresh prompt of 3
        lengths = [7, 3, 11, 3]
        rows = [(0, 6, 7), (1, 2, 3), (2, 6, 11), (3, 0, 3)]  # (sequence, first new position, end)
        decodes = [0, 1]
    else:  # three fresh prompts of uneven lengths, one a whole number of blocks
        lengths = [5, 16, 23]
        rows = [(0, 0, 5), (1, 0, 16), (2, 0, 23)]
        decodes = []
    attn = Attention(HEADS, KV_HEADS, DIM)
    attn.allocate_cache(NUM_BLOCKS, BLOCK, dtype, torch.device("cpu"))
    seqs = PagedSequences(attn, lengths, dtype, seed=int(torch.randint(0, 1000, ())))
    for s, start, _ in rows:
        seqs.store(s, 0, start)
    q = torch.randn(sum(end - start for _, start, end in rows), HEADS * DIM).to(dtype)
    k = torch.cat([seqs.keys[s][start:end] for s, start, end in rows])
    v = torch.cat([seqs.values[s][start:end] for s, start, end in rows])
    if decodes:
        meta = seqs.decode_metadata(decodes, [lengths[s] for s in decodes])
    else:
        meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long))
    meta.slot_mapping = torch.cat([seqs.slots(s, start, end) for s, start, end in rows])
    offset = 0
    for s, start, end in rows:
        if s not in decodes:
            meta.prefills.append(PrefillChunk(offset, end - start, end, seqs.slots(s, 0, end)))
        offset += end - start
    gpu, gpu_meta = _on_cuda(attn, meta)
    with attention_context(gpu_meta):
        out = gpu(q.cuda(), k.cuda(), v.cuda())
    assert gpu_meta.derived.get(("varlen",)) is not None  # the varlen path ran
    expected, offset = [], 0
    for s, start, end in rows:
        expected.append(
            reference(q[offset : offset + end - start], seqs.keys[s][:end], seqs.values[s][:end], start)
        )
        offset += end - start
    torch.testing.assert_close(out.float().cpu(), torch.cat(expected), atol=2e-2, rtol=2e-2)
