"""Causal self-attention over the paged KV cache (plain PyTorch path, used on CPU and as reference).

The model runner packs the tokens of every scheduled sequence into one flat batch: first the decode
tokens (one query each), then the prefill chunks. `AttentionMetadata` says where each new token's K/V
goes (`slot_mapping`) and which cache slots each query reads. With no metadata set (a plain forward of
one sequence, as in unit tests) the layer is ordinary causal attention over its input.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class PrefillChunk:
    """One sequence's run of new query tokens (a prompt chunk, or a recompute after preemption)."""

    query_start: int  # offset of the chunk in the packed batch
    query_len: int
    context_len: int  # tokens in the cache once this chunk is written (prefix + chunk)
    context_slots: torch.Tensor  # [context_len] flat cache slots of the whole context


@dataclass
class AttentionMetadata:
    """Per-step layout of the packed batch, built once by the model runner and shared by every layer."""

    slot_mapping: torch.Tensor  # [num_tokens] flat slot written by each new token
    num_decode_tokens: int = 0
    decode_slots: torch.Tensor | None = None  # [num_decodes, max_context] slots read by each decode query
    decode_mask: torch.Tensor | None = None  # [num_decodes, 1, 1, max_context] True where a slot is valid
    prefills: list[PrefillChunk] = field(default_factory=list)


_metadata: AttentionMetadata | None = None


@contextlib.contextmanager
def attention_context(metadata: AttentionMetadata | None) -> Iterator[None]:
    """Make `metadata` visible to every `Attention` layer for the duration of one forward pass."""
    global _metadata
    previous, _metadata = _metadata, metadata
    try:
        yield
    finally:
        _metadata = previous


class Attention(nn.Module):
    """Multi-head / grouped-query attention reading and writing one layer of the paged KV cache."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale if scale is not None else head_dim**-0.5
        # [num_blocks, block_size, num_kv_heads, head_dim] each; bound by the model runner.
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, heads*dim], k/v: [T, kv_heads*dim] -> [T, heads*dim]."""
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        meta = _metadata
        paged = meta is not None and self.k_cache is not None
        out = self._paged(q, k, v, meta) if paged else self._causal(q, k, v)
        return out.reshape(num_tokens, self.num_heads * self.head_dim)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> torch.Tensor:
        # q: [B, H, Lq, D], k/v: [B, Hkv, Lk, D]
        return F.scaled_dot_product_attention(
            q, k, v, scale=self.scale, enable_gqa=self.num_kv_heads != self.num_heads, **kw
        )

    def _decode(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """One query per sequence: q [B, H, D], keys/values [B, L, Hkv, D], mask [B, 1, 1, L].

        Two batched matmuls; for a single query they cost far less than a fused attention kernel's
        set-up. The query heads sharing a KV head are grouped, so K/V are never repeated.
        """
        b, length = keys.shape[:2]
        group = self.num_heads // self.num_kv_heads
        qg = q.view(b, self.num_kv_heads, group, self.head_dim)
        scores = torch.matmul(qg, keys.permute(0, 2, 3, 1)).float() * self.scale  # [B, Hkv, G, L]
        scores.masked_fill_(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(values.dtype)
        out = torch.matmul(probs, values.transpose(1, 2))  # [B, Hkv, G, D]
        return out.reshape(b, self.num_heads, self.head_dim)

    def _causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = self._sdpa(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], is_causal=True
        )
        return out[0].transpose(0, 1)

    def _paged(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        k_flat = self.k_cache.view(-1, self.num_kv_heads, self.head_dim)
        v_flat = self.v_cache.view(-1, self.num_kv_heads, self.head_dim)
        k_flat.index_copy_(0, meta.slot_mapping, k.to(k_flat.dtype))
        v_flat.index_copy_(0, meta.slot_mapping, v.to(v_flat.dtype))
        out = torch.empty_like(q)
        nd = meta.num_decode_tokens
        if nd:
            out[:nd] = self._decode(
                q[:nd], k_flat[meta.decode_slots], v_flat[meta.decode_slots], meta.decode_mask
            )
        for chunk in meta.prefills:
            s, n = chunk.query_start, chunk.query_len
            qc = q[s : s + n].transpose(0, 1)[None]
            if chunk.context_len == n:  # nothing cached before this chunk: attend to its own tokens
                kc, vc = k[s : s + n], v[s : s + n]
                o = self._sdpa(qc, kc.transpose(0, 1)[None], vc.transpose(0, 1)[None], is_causal=True)
            else:
                kc = k_flat[chunk.context_slots].transpose(0, 1)[None]
                vc = v_flat[chunk.context_slots].transpose(0, 1)[None]
                mask = _chunk_causal_mask(n, chunk.context_len, q.device)
                o = self._sdpa(qc, kc, vc, attn_mask=mask)
            out[s : s + n] = o[0].transpose(0, 1)
        return out


def _chunk_causal_mask(query_len: int, context_len: int, device: torch.device) -> torch.Tensor:
    """Query i of a chunk sits at position context_len - query_len + i and sees keys up to it."""
    q_pos = torch.arange(context_len - query_len, context_len, device=device)[:, None]
    k_pos = torch.arange(context_len, device=device)[None, :]
    return k_pos <= q_pos
