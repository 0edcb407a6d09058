"""Attention with logit soft-capping (Gemma 2) against softmax attention over softcap * tanh(scores /
softcap) written out: the plain causal path, and the all-chunks-at-once prefill that replaces
FlashAttention's varlen call on CUDA (run here on the CPU), for fresh chunks and for a chunk over a cached
prefix. The cap is low enough that leaving it out fails."""

from __future__ import annotations

import torch

from gptserve.layers.attention import Attention, PrefillChunk, VarlenPrefill

HEADS, KV_HEADS, DIM, SOFTCAP, SCALE = 4, 2, 16, 2.0, 0.2


def capped_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softcap: float | None
) -> torch.Tensor:
    """q/k/v of one whole sequence, [n, heads*dim] and [n, kv_heads*dim] -> [n, heads*dim]."""
    n, group = q.shape[0], HEADS // KV_HEADS
    qh = q.view(n, HEADS, DIM).transpose(0, 1)
    kh = k.view(n, KV_HEADS, DIM).transpose(0, 1).repeat_interleave(group, dim=0)
    vh = v.view(n, KV_HEADS, DIM).transpose(0, 1).repeat_interleave(group, dim=0)
    scores = qh @ kh.transpose(1, 2) * SCALE
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    return (probs @ vh).transpose(0, 1).reshape(n, HEADS * DIM)


def random_sequence(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = 3 * torch.randn(n, HEADS * DIM, generator=g)
    return q, 3 * torch.randn(n, KV_HEADS * DIM, generator=g), 3 * torch.randn(n, KV_HEADS * DIM, generator=g)


def packed_kv(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.cat((k, v), dim=-1).view(k.shape[0], 2 * KV_HEADS, DIM)


def test_softcapped_causal_attention_matches_reference():
    q, k, v = random_sequence(20, torch.Generator().manual_seed(0))
    out = Attention(HEADS, KV_HEADS, DIM, scale=SCALE, softcap=SOFTCAP)(q, k, v)
    assert (out - capped_reference(q, k, v, SOFTCAP)).abs().max() < 1e-5
    assert (out - capped_reference(q, k, v, None)).abs().max() > 1e-2


def test_softcapped_prefill_of_fresh_chunks():
    g = torch.Generator().manual_seed(1)
    seqs = [random_sequence(n, g) for n in (7, 13)]
    attn = Attention(HEADS, KV_HEADS, DIM, scale=SCALE, softcap=SOFTCAP)
    chunks = [PrefillChunk(0, 7, 7, torch.empty(0)), PrefillChunk(7, 13, 13, torch.empty(0))]
    q = torch.cat([s[0] for s in seqs])
    kv = torch.cat([packed_kv(s[1], s[2]) for s in seqs])
    out = attn._prefill_softcapped(q, kv, VarlenPrefill.of(chunks, q.device))
    expected = torch.cat([capped_reference(*s, SOFTCAP) for s in seqs])
    assert (out - expected).abs().max() < 1e-5


def test_softcapped_prefill_over_a_cached_prefix():
    g = torch.Generator().manual_seed(2)
    (qa, ka, va), (qb, kb, vb) = random_sequence(20, g), random_sequence(6, g)
    attn = Attention(HEADS, KV_HEADS, DIM, scale=SCALE, softcap=SOFTCAP)
    attn.allocate_cache(16, 4, torch.float32, torch.device("cpu"))
    slots_a, slots_b = torch.arange(0, 20), torch.arange(32, 38)
    for slots, k, v in ((slots_a, ka, va), (slots_b, kb, vb)):  # the cache as this step leaves it
        attn._slots[:, slots] = packed_kv(k, v).transpose(0, 1)
    chunks = [PrefillChunk(0, 8, 20, slots_a), PrefillChunk(8, 6, 6, slots_b)]  # a's first 12 were cached
    q = torch.cat([qa[12:], qb])
    kv = torch.cat([packed_kv(ka[12:], va[12:]), packed_kv(kb, vb)])
    out = attn._prefill_softcapped(q, kv, VarlenPrefill.of(chunks, q.device))
    expected = torch.cat([capped_reference(qa, ka, va, SOFTCAP)[12:], capped_reference(qb, kb, vb, SOFTCAP)])
    assert (out - expected).abs().max() < 1e-5
