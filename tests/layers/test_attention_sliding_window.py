"""Sliding-window attention (Mistral) against dense attention under transformers' mask, a query at
position p seeing keys p - W < k <= p: the plain causal path, one mixed paged step on the CPU (decodes,
a fresh prefill, a chunk over a cached prefix that spans the window's edge), the all-chunks-at-once
masked prefill used on CUDA for capped scores (run here on the CPU).
Every case reaches past the window, so leaving the window out fails."""

from __future__ import annotations

import torch

from gptserve.layers.attention import (
    Attention,
    AttentionMetadata,
    PrefillChunk,
    VarlenPrefill,
    attention_context,
)

HEADS, KV_HEADS, DIM, WINDOW, BLOCK = 4, 2, 16, 8, 4


def windowed_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, softcap: float | None = None
) -> torch.Tensor:
    """q/k/v of one whole sequence, [n, heads*dim] and [n, kv_heads*dim] -> [n, heads*dim]."""
    n, group = q.shape[0], HEADS // KV_HEADS
    qh = q.view(n, HEADS, DIM).transpose(0, 1)
    kh = k.view(n, KV_HEADS, DIM).transpose(0, 1).repeat_interleave(group, dim=0)
    vh = v.view(n, KV_HEADS, DIM).transpose(0, 1).repeat_interleave(group, dim=0)
    scores = qh @ kh.transpose(1, 2) * DIM**-0.5
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    pos = torch.arange(n)
    visible = pos[None, :] <= pos[:, None]
    if window is not None:
        visible &= pos[None, :] > pos[:, None] - window
    probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
    return (probs @ vh).transpose(0, 1).reshape(n, HEADS * DIM)


def random_sequence(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = 3 * torch.randn(n, HEADS * DIM, generator=g)
    return q, 3 * torch.randn(n, KV_HEADS * DIM, generator=g), 3 * torch.randn(n, KV_HEADS * DIM, generator=g)


def packed_kv(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.cat((k, v), dim=-1).view(k.shape[0], 2 * KV_HEADS, DIM)


def test_causal_attention_keeps_to_the_window():
    q, k, v = random_sequence(3 * WINDOW, torch.Generator().manual_seed(0))
    out = Attention(HEADS, KV_HEADS, DIM, sliding_window=WINDOW)(q, k, v)
    assert (out - windowed_reference(q, k, v, WINDOW)).abs().max() < 1e-5
    assert (out - windowed_reference(q, k, v, None)).abs().max() > 1e-2
    softcapped = Attention(HEADS, KV_HEADS, DIM, softcap=2.0, sliding_window=WINDOW)(q, k, v)
    assert (softcapped - windowed_reference(q, k, v, WINDOW, softcap=2.0)).abs().max() < 1e-5


def windowed_paged_step(
    device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One paged step with decodes at contexts 30 and 5, 8 new tokens after 12 cached ones and a fresh
    18-token prompt, window 8, run on `device` in `dtype`: (output, windowed reference, whole-context
    reference), the references in float32."""
    g = torch.Generator().manual_seed(1)
    lengths, firsts, starts = (30, 5, 20, 18), (29, 4, 12, 0), (0, 32, 40, 64)  # tokens, cached, slot 0
    seqs = [random_sequence(n, g) for n in lengths]
    attn = Attention(HEADS, KV_HEADS, DIM, sliding_window=WINDOW)
    attn.allocate_cache(24, BLOCK, dtype, device)
    slots = [torch.arange(s, s + n, device=device) for s, n in zip(starts, lengths)]
    for (_, k, v), slot, cached in zip(seqs, slots, firsts):  # what earlier steps wrote
        attn._slots[:, slot[:cached]] = packed_kv(k[:cached], v[:cached]).transpose(0, 1).to(device, dtype)
    chunks, offset = [], 2
    for index in (2, 3):
        n = lengths[index] - firsts[index]
        chunks.append(PrefillChunk(offset, n, lengths[index], slots[index]))
        offset += n
    meta = AttentionMetadata(
        slot_mapping=torch.cat([slot[cached:] for slot, cached in zip(slots, firsts)]),
        num_decode_tokens=2,
        decode_blocks=torch.tensor([list(range(8)), [8, 9] + [0] * 6], device=device),
        decode_context_lens=[30, 5],
        prefills=chunks,
    )
    q, k, v = (
        torch.cat([s[i][cached:] for s, cached in zip(seqs, firsts)]).to(device, dtype) for i in range(3)
    )
    with attention_context(meta):
        out = attn(q, k, v)
    expected = torch.cat([windowed_reference(*s, WINDOW)[cached:] for s, cached in zip(seqs, firsts)])
    whole = torch.cat([windowed_reference(*s, None)[cached:] for s, cached in zip(seqs, firsts)])
    return out.float().cpu(), expected, whole


def test_one_paged_step_of_decodes_and_prefill_chunks():
    out, expected, whole = windowed_paged_step(torch.device("cpu"), torch.float32)
    assert (out - expected).abs().max() < 1e-4
    assert (out - whole).abs().max() > 1e-2


def test_masked_prefill_over_a_cached_prefix_keeps_to_the_window():
    g = torch.Generator().manual_seed(2)
    (qa, ka, va), (qb, kb, vb) = random_sequence(20, g), random_sequence(6, g)
    attn = Attention(HEADS, KV_HEADS, DIM, softcap=2.0, sliding_window=WINDOW)
    attn.allocate_cache(16, BLOCK, torch.float32, torch.device("cpu"))
    slots_a, slots_b = torch.arange(0, 20), torch.arange(32, 38)
    for slots, k, v in ((slots_a, ka, va), (slots_b, kb, vb)):
        attn._slots[:, slots] = packed_kv(k, v).transpose(0, 1)
    chunks = [PrefillChunk(0, 8, 20, slots_a), PrefillChunk(8, 6, 6, slots_b)]
    q = torch.cat([qa[12:], qb])
    kv = torch.cat([packed_kv(ka[12:], va[12:]), packed_kv(kb, vb)])
    out = attn._prefill_softcapped(q, kv, VarlenPrefill.of(chunks, q.device))
    expected = torch.cat(
        [windowed_reference(qa, ka, va, WINDOW, 2.0)[12:], windowed_reference(qb, kb, vb, WINDOW, 2.0)]
    )
    assert (out - expected).abs().max() < 1e-5
