"""Paged attention (the CPU path) against plain softmax attention over the same keys and values, on random
inputs: decode batches of uneven lengths with grouped-query heads, a step that mixes decodes with a
prefill chunk over a cached prefix, and the packed-qkv entry point against the separate one."""

from __future__ import annotations

import pytest
import torch

from gptserve.layers.attention import Attention, AttentionMetadata, PrefillChunk, attention_context

HEADS, KV_HEADS, DIM, BLOCK, NUM_BLOCKS = 6, 2, 16, 4, 40
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, first_position: int) -> torch.Tensor:
    """q [n, H*D] at positions first_position.., keys/values [L, Hkv*D] for positions 0..L-1 -> [n, H*D]."""
    n, length, group = q.shape[0], keys.shape[0], HEADS // KV_HEADS
    qh = q.float().view(n, HEADS, DIM).transpose(0, 1)
    kh = keys.float().view(length, KV_HEADS, DIM).transpose(0, 1).repeat_interleave(group, dim=0)
    vh = values.float().view(length, KV_HEADS, DIM).transpose(0, 1).repeat_interleave(group, dim=0)
    scores = qh @ kh.transpose(1, 2) * DIM**-0.5
    visible = torch.arange(length)[None, :] <= torch.arange(first_position, first_position + n)[:, None]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
    return (probs @ vh).transpose(0, 1).reshape(n, HEADS * DIM)


class PagedSequences:
    """Random sequences laid out over random cache blocks, their earlier K/V already in the cache."""

    def __init__(self, attn: Attention, lengths: list[int], dtype: torch.dtype, seed: int):
        g = torch.Generator().manual_seed(seed)
        blocks = torch.randperm(NUM_BLOCKS, generator=g).tolist()
        self.tables: list[list[int]] = []
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for length in lengths:
            count = (length - 1) // BLOCK + 1
            self.tables.append(blocks[:count])
            blocks = blocks[count:]
            self.keys.append(torch.randn(length, KV_HEADS * DIM, generator=g).to(dtype))
            self.values.append(torch.randn(length, KV_HEADS * DIM, generator=g).to(dtype))
        self.attn = attn

    def slots(self, seq: int, start: int, end: int) -> torch.Tensor:
        slots = [self.tables[seq][p // BLOCK] * BLOCK + p % BLOCK for p in range(start, end)]
        return torch.tensor(slots, dtype=torch.long)

    def store(self, seq: int, start: int, end: int) -> None:
        """Write positions [start, end) of a sequence straight into the cache, as earlier steps would."""
        flat = self.attn.kv_cache.view(2 * KV_HEADS, -1, DIM)
        index = self.slots(seq, start, end)
        flat[:KV_HEADS, index] = self.keys[seq][start:end].view(-1, KV_HEADS, DIM).transpose(0, 1)
        flat[KV_HEADS:, index] = self.values[seq][start:end].view(-1, KV_HEADS, DIM).transpose(0, 1)

    def decode_metadata(self, seqs: list[int], lengths: list[int]) -> AttentionMetadata:
        width = max(len(self.tables[s]) for s in seqs)
        tables = [self.tables[s] + self.tables[s][-1:] * (width - len(self.tables[s])) for s in seqs]
        return AttentionMetadata(
            slot_mapping=torch.cat([self.slots(s, n - 1, n) for s, n in zip(seqs, lengths)]),
            num_decode_tokens=len(seqs),
            decode_blocks=torch.tensor(tables),
            decode_context_lens=lengths,
        )


def make_attention(dtype: torch.dtype) -> Attention:
    attn = Attention(HEADS, KV_HEADS, DIM)
    attn.allocate_cache(NUM_BLOCKS, BLOCK, dtype, torch.device("cpu"))
    return attn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths", [[1], [9], [1, 5, 12, 9, 4]])
def test_decode_batch_matches_reference(dtype, lengths):
    attn = make_attention(dtype)
    seqs = PagedSequences(attn, lengths, dtype, seed=len(lengths))
    for i, n in enumerate(lengths):
        seqs.store(i, 0, n - 1)
    q = torch.randn(len(lengths), HEADS * DIM, generator=torch.Generator().manual_seed(7)).to(dtype)
    k = torch.cat([seqs.keys[i][n - 1 : n] for i, n in enumerate(lengths)])
    v = torch.cat([seqs.values[i][n - 1 : n] for i, n in enumerate(lengths)])
    with attention_context(seqs.decode_metadata(list(range(len(lengths))), lengths)):
        out = attn(q, k, v)
        packed = attn.forward_packed(torch.cat((q, k, v), dim=-1))
    assert out.dtype == dtype and out.shape == q.shape
    expected = torch.cat(
        [reference(q[i : i + 1], seqs.keys[i], seqs.values[i], n - 1) for i, n in enumerate(lengths)]
    )
    torch.testing.assert_close(out.float(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    assert torch.equal(packed, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_mixing_decodes_and_a_prefill_chunk(dtype):
    # Two decodes, a chunk of 5 new tokens after a cached prefix of 6, and a fresh prompt of 3.
    lengths = [7, 3, 11, 3]
    attn = make_attention(dtype)
    seqs = PagedSequences(attn, lengths, dtype, seed=11)
    seqs.store(0, 0, 6)
    seqs.store(1, 0, 2)
    seqs.store(2, 0, 6)
    g = torch.Generator().manual_seed(3)
    rows = [(0, 6, 7), (1, 2, 3), (2, 6, 11), (3, 0, 3)]  # (sequence, first new position, end)
    q = torch.randn(sum(end - start for _, start, end in rows), HEADS * DIM, generator=g).to(dtype)
    k = torch.cat([seqs.keys[s][start:end] for s, start, end in rows])
    v = torch.cat([seqs.values[s][start:end] for s, start, end in rows])
    meta = seqs.decode_metadata([0, 1], [7, 3])
    meta.slot_mapping = torch.cat([seqs.slots(s, start, end) for s, start, end in rows])
    meta.prefills = [
        PrefillChunk(2, 5, 11, seqs.slots(2, 0, 11)),
        PrefillChunk(7, 3, 3, seqs.slots(3, 0, 3)),
    ]
    with attention_context(meta):
        out = attn(q, k, v)
    expected, offset = [], 0
    for s, start, end in rows:
        expected.append(
            reference(q[offset : offset + end - start], seqs.keys[s][:end], seqs.values[s][:end], start)
        )
        offset += end - start
    torch.testing.assert_close(out.float(), torch.cat(expected), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_without_metadata_it_is_causal_attention_over_the_input():
    attn = Attention(HEADS, KV_HEADS, DIM)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(9, n * DIM, generator=g) for n in (HEADS, KV_HEADS, KV_HEADS))
    torch.testing.assert_close(attn(q, k, v), reference(q, k, v, 0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn.forward_packed(torch.cat((q, k, v), dim=-1)), attn(q, k, v))


def test_copy_blocks_copies_k_and_v():
    attn = make_attention(torch.float32)
    attn.kv_cache.normal_()
    attn.copy_blocks(torch.tensor([3, 5]), torch.tensor([10, 11]))
    assert torch.equal(attn.k_cache[:, [10, 11]], attn.k_cache[:, [3, 5]])
    assert torch.equal(attn.v_cache[:, [10, 11]], attn.v_cache[:, [3, 5]])
