"""Attention with logit soft-capping (Gemma 2) on the plain causal path against softmax attention over
softcap * tanh(scores / softcap) written out; the cap is low enough that leaving it out fails."""

from __future__ import annotations

import torch

from gptserve.layers.attention import Attention

HEADS, KV_HEADS, DIM, TOKENS, SOFTCAP, SCALE = 4, 2, 16, 20, 2.0, 0.2


def capped_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softcap: float | None
) -> torch.Tensor:
    group = HEADS // KV_HEADS
    qh = q.view(TOKENS, HEADS, DIM).transpose(0, 1)
    kh = k.view(TOKENS, KV_HEADS, DIM).transpose(0, 1).repeat_interleave(group, dim=0)
    vh = v.view(TOKENS, KV_HEADS, DIM).transpose(0, 1).repeat_interleave(group, dim=0)
    scores = qh @ kh.transpose(1, 2) * SCALE
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    causal = torch.ones(TOKENS, TOKENS, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    return (probs @ vh).transpose(0, 1).reshape(TOKENS, HEADS * DIM)


def test_softcapped_causal_attention_matches_reference():
    g = torch.Generator().manual_seed(0)
    q = 3 * torch.randn(TOKENS, HEADS * DIM, generator=g)
    k, v = (3 * torch.randn(TOKENS, KV_HEADS * DIM, generator=g) for _ in range(2))
    out = Attention(HEADS, KV_HEADS, DIM, scale=SCALE, softcap=SOFTCAP)(q, k, v)
    assert (out - capped_reference(q, k, v, SOFTCAP)).abs().max() < 1e-5
    assert (out - capped_reference(q, k, v, None)).abs().max() > 1e-2
