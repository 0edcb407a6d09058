"""Causal self-attention over the paged KV cache (plain PyTorch path, used on CPU and as reference).

The model runner packs the tokens of every scheduled sequence into one flat batch: first the decode
tokens (one query each), then the prefill chunks. `AttentionMetadata` says where each new token's K/V
goes (`slot_mapping`) and which cache blocks or slots each query reads. With no metadata set (a plain
forward of one sequence, as in unit tests) the layer is ordinary causal attention over its input.

The cache is head-major, [num_kv_heads, num_blocks, block_size, head_dim]: gathering a sequence's blocks
along dim 1 then yields each KV head's keys as one contiguous [context, head_dim] matrix, the operand a
batched matmul takes as it is, so decoding copies the context once (the gather) and never transposes it.
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
    decode_blocks: torch.Tensor | None = None  # [num_decodes, max_blocks] block table of each decode query
    decode_context_len: int = 0  # longest decode context; the gathered blocks beyond it are not read
    # [num_decodes, decode_context_len] float32: 0 where a slot holds context, -inf past a shorter
    # sequence's end. None when every decode context has the same length, so nothing needs masking.
    decode_bias: torch.Tensor | None = None
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
        # [num_kv_heads, num_blocks, block_size, head_dim] each; see `allocate_cache`.
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def allocate_cache(
        self, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        """Bind zeroed K and V caches of `num_blocks` blocks in this layer's layout."""
        shape = (self.num_kv_heads, num_blocks, block_size, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy whole cache blocks `src[i]` -> `dst[i]` (copy-on-write of a shared prefix block)."""
        self.k_cache[:, dst] = self.k_cache[:, src]
        self.v_cache[:, dst] = self.v_cache[:, src]

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
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        context_len: int,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        """One query per sequence: q [B, H, D]; keys/values [Hkv, B, L, D] (the gathered blocks, L >=
        context_len); bias [B, context_len] float32 or None -> [B, H, D].

        Two batched matmuls over (KV head, sequence) pairs: the query heads that share a KV head form
        the rows of one small matrix, so K/V are never repeated for GQA, and each pair's keys are a
        contiguous matrix read in place. For one query this costs far less than a fused attention
        kernel's set-up. The scale goes into q (a power of two for the usual head sizes, so exact).
        """
        b = q.shape[0]
        hkv, group, dim = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        keys = keys[:, :, :context_len].reshape(hkv * b, context_len, dim)
        values = values[:, :, :context_len].reshape(hkv * b, context_len, dim)
        qg = q.view(b, hkv, group, dim).transpose(0, 1).reshape(hkv * b, group, dim) * self.scale
        scores = torch.bmm(qg, keys.transpose(1, 2))  # [Hkv*B, G, L]
        if bias is not None:
            scores = scores.view(hkv, b, group, context_len) + bias[None, :, None, :]  # float32
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
        out = torch.bmm(probs.view(hkv * b, group, context_len), values)  # [Hkv*B, G, D]
        return out.view(hkv, b, group, dim).transpose(0, 1).reshape(b, self.num_heads, dim)

    def _causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = self._sdpa(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], is_causal=True
        )
        return out[0].transpose(0, 1)

    def _paged(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        hkv, dim = self.num_kv_heads, self.head_dim
        k_flat = self.k_cache.view(hkv, -1, dim)  # [Hkv, slots, D]
        v_flat = self.v_cache.view(hkv, -1, dim)
        k_flat.index_copy_(1, meta.slot_mapping, k.transpose(0, 1).to(k_flat.dtype))
        v_flat.index_copy_(1, meta.slot_mapping, v.transpose(0, 1).to(v_flat.dtype))
        nd = meta.num_decode_tokens
        if nd == q.shape[0] and not meta.prefills:
            return self._decode_batch(q, meta)
        out = torch.empty_like(q)
        if nd:
            out[:nd] = self._decode_batch(q[:nd], meta)
        for chunk in meta.prefills:
            s, n = chunk.query_start, chunk.query_len
            qc = q[s : s + n].transpose(0, 1)[None]
            if chunk.context_len == n:  # nothing cached before this chunk: attend to its own tokens
                kc, vc = k[s : s + n], v[s : s + n]
                o = self._sdpa(qc, kc.transpose(0, 1)[None], vc.transpose(0, 1)[None], is_causal=True)
            else:
                kc = k_flat.index_select(1, chunk.context_slots)[None]  # [1, Hkv, L, D]
                vc = v_flat.index_select(1, chunk.context_slots)[None]
                mask = _chunk_causal_mask(n, chunk.context_len, q.device)
                o = self._sdpa(qc, kc, vc, attn_mask=mask)
            out[s : s + n] = o[0].transpose(0, 1)
        return out

    def _decode_batch(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        blocks = meta.decode_blocks
        b, num_blocks = blocks.shape
        shape = (self.num_kv_heads, b, num_blocks * self.k_cache.shape[2], self.head_dim)
        flat = blocks.view(-1)
        keys = self.k_cache.index_select(1, flat).view(shape)
        values = self.v_cache.index_select(1, flat).view(shape)
        return self._decode(q, keys, values, meta.decode_context_len, meta.decode_bias)


def _chunk_causal_mask(query_len: int, context_len: int, device: torch.device) -> torch.Tensor:
    """Query i of a chunk sits at position context_len - query_len + i and sees keys up to it."""
    q_pos = torch.arange(context_len - query_len, context_len, device=device)[:, None]
    k_pos = torch.arange(context_len, device=device)[None, :]
    return k_pos <= q_pos
