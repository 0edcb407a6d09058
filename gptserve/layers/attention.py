"""Causal self-attention over the paged KV cache: the Triton kernels on CUDA (paged decode, the KV
write fused with the rotary embedding) and FlashAttention's varlen call for half-precision prefill there;
plain PyTorch on CPU, which is also the reference the kernels are tested against.

The model runner packs the tokens of every scheduled sequence into one flat batch: first the decode
tokens (one query each), then the prefill chunks. `AttentionMetadata` says where each new token's K/V
goes (`slot_mapping`) and which cache blocks or slots each query reads. With no metadata set (a plain
forward of one sequence, as in unit tests) the layer is ordinary causal attention over its input.

Each layer's cache is one head-major tensor, [2 * num_kv_heads, num_blocks, block_size, head_dim], K heads
then V heads (`k_cache` and `v_cache` are its halves). A (head, block) pair is one contiguous row, so a
decode step gathers every K and V row its sequences read with a single row copy, and each (KV head,
sequence) pair's keys come out as one contiguous [context, head_dim] matrix, the operand a batched
matmul takes as it is: the context is copied once and never transposed.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from gptserve.layers.rotary import Rope, RotaryEmbedding


@dataclass
class PrefillChunk:
    """One sequence's run of new query tokens (a prompt chunk, or a recompute after preemption)."""

    query_start: int  # offset of the chunk in the packed batch
    query_len: int
    context_len: int  # tokens in the cache once this chunk is written (prefix + chunk)
    context_slots: torch.Tensor  # [context_len] flat cache slots of the whole context


@dataclass
class VarlenPrefill:
    """Every prefill chunk of a step as one variable-length attention call: cumulative query and key
    offsets, and the cache slots of all contexts when some chunk continues a cached prefix (None when
    every chunk is a sequence's first, so its keys are the step's own new tokens)."""

    cu_queries: torch.Tensor  # int32 [chunks + 1]
    cu_keys: torch.Tensor  # int32 [chunks + 1]
    max_query_len: int
    max_key_len: int
    context_slots: torch.Tensor | None

    @staticmethod
    def of(chunks: list[PrefillChunk], device: torch.device) -> VarlenPrefill:
        queries = [0]
        keys = [0]
        for chunk in chunks:
            queries.append(queries[-1] + chunk.query_len)
            keys.append(keys[-1] + chunk.context_len)
        fresh = all(chunk.context_len == chunk.query_len for chunk in chunks)
        return VarlenPrefill(
            cu_queries=torch.tensor(queries, dtype=torch.int32, device=device),
            cu_keys=torch.tensor(keys, dtype=torch.int32, device=device),
            max_query_len=max(chunk.query_len for chunk in chunks),
            max_key_len=max(chunk.context_len for chunk in chunks),
            context_slots=None if fresh else torch.cat([chunk.context_slots for chunk in chunks]),
        )


@dataclass
class AttentionMetadata:
    """Per-step layout of the packed batch, built once by the model runner and shared by every layer."""

    slot_mapping: torch.Tensor  # [num_tokens] flat slot written by each new token
    num_decode_tokens: int = 0
    # [num_decodes, max_blocks] block table of each decode query, shorter ones padded with any valid block
    decode_blocks: torch.Tensor | None = None
    decode_context_lens: list[int] = field(default_factory=list)  # tokens each decode query attends to
    prefills: list[PrefillChunk] = field(default_factory=list)
    # Index and mask tensors derived from the decode block tables, built by the first layer that needs
    # them and reused by the rest (every layer of a model has the same cache shape).
    derived: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)
    # CUDA: `decode_context_lens` as a device tensor; a CUDA graph binds its own static buffer here.
    decode_context_lens_device: torch.Tensor | None = None

    def varlen_prefill(self) -> VarlenPrefill:
        """The prefill chunks as one packed varlen attention problem (built once, shared by the layers)."""
        layout = self.derived.get(("varlen",))
        if layout is None:
            layout = VarlenPrefill.of(self.prefills, self.slot_mapping.device)
            self.derived[("varlen",)] = layout
        return layout

    def decode_lens_tensor(self) -> torch.Tensor:
        """int32 [num_decodes] context length of each decode query, on the block tables' device."""
        if self.decode_context_lens_device is None:
            self.decode_context_lens_device = torch.tensor(
                self.decode_context_lens, dtype=torch.int32, device=self.decode_blocks.device
            )
        return self.decode_context_lens_device

    def decode_gather_rows(self, num_kv_heads: int, num_blocks: int) -> torch.Tensor:
        """Row indices into a [2 * num_kv_heads * num_blocks, block_size * head_dim] view of a cache:
        for K then V, each KV head, each sequence, its blocks in order."""
        key = ("rows", num_kv_heads, num_blocks)
        rows = self.derived.get(key)
        if rows is None:
            heads = torch.arange(2 * num_kv_heads, device=self.decode_blocks.device) * num_blocks
            rows = (heads[:, None, None] + self.decode_blocks[None]).flatten()
            self.derived[key] = rows
        return rows

    def decode_bias(
        self, num_kv_heads: int, block_size: int, sliding_window: int | None = None
    ) -> torch.Tensor:
        """float32 additive mask over the gathered slots: 0 within each query's context, -inf past it
        (and, with a sliding window W, before its last W tokens).
        [num_kv_heads * num_decodes, 1, slots], or [1, 1, slots] for a single query."""
        key = ("bias", num_kv_heads, block_size, sliding_window)
        bias = self.derived.get(key)
        if bias is None:
            device = self.decode_blocks.device
            slots = torch.arange(self.decode_blocks.shape[1] * block_size, device=device)
            lens = torch.tensor(self.decode_context_lens, device=device)
            bias = torch.zeros(len(lens), len(slots), device=device)
            bias.masked_fill_(slots[None, :] >= lens[:, None], float("-inf"))
            if sliding_window is not None:
                bias.masked_fill_(slots[None, :] < lens[:, None] - sliding_window, float("-inf"))
            if len(lens) > 1:
                bias = bias.repeat(num_kv_heads, 1)
            bias = bias[:, None, :]
            self.derived[key] = bias
        return bias


# Per thread: a process may run several engines (one per repository model), each on its own thread.
_state = threading.local()


def _current_metadata() -> AttentionMetadata | None:
    return getattr(_state, "metadata", None)


@contextlib.contextmanager
def attention_context(metadata: AttentionMetadata | None) -> Iterator[None]:
    """Make `metadata` visible to every `Attention` layer of this thread for one forward pass."""
    previous = _current_metadata()
    _state.metadata = metadata
    try:
        yield
    finally:
        _state.metadata = previous


class Attention(nn.Module):
    """Multi-head / grouped-query attention reading and writing one layer of the paged KV cache."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float | None = None,
        softcap: float | None = None,
        sliding_window: int | None = None,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale if scale is not None else head_dim**-0.5
        # Logit soft-capping (Gemma 2): scores become softcap * tanh(scores / softcap) before the mask.
        self.softcap = softcap
        # Sliding window W (Mistral): a query at position p sees keys at positions p - W < k <= p.
        self.sliding_window = sliding_window
        # [2 * num_kv_heads, num_blocks, block_size, head_dim]; k_cache / v_cache are its two halves,
        # [num_kv_heads, num_blocks, block_size, head_dim] each. Bound by `allocate_cache`.
        self.kv_cache: torch.Tensor | None = None
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self._arrivals: torch.Tensor | None = None  # CUDA: the decode kernel's split counters

    def allocate_cache(
        self, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        """Bind a zeroed K/V cache of `num_blocks` blocks in this layer's layout."""
        heads, dim = 2 * self.num_kv_heads, self.head_dim
        self.kv_cache = torch.zeros((heads, num_blocks, block_size, dim), dtype=dtype, device=device)
        if device.type == "cuda":  # the decode kernel's split counters, zeroed once, outside any graph
            from gptserve.kernels.paged_attention import arrival_counters

            self._arrivals = arrival_counters(device)
        self.k_cache, self.v_cache = self.kv_cache.chunk(2)
        self._slots = self.kv_cache.view(heads, num_blocks * block_size, dim)  # [2*Hkv, slots, D]
        self._rows = self.kv_cache.view(heads * num_blocks, block_size * dim)  # one (head, block) per row

    def release_cache(self) -> None:
        """Drop this layer's cache tensors (the engine is being closed)."""
        self.kv_cache = self.k_cache = self.v_cache = None
        self._slots = self._rows = self._arrivals = None

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy whole cache blocks `src[i]` -> `dst[i]` (copy-on-write of a shared prefix block)."""
        cache = _bytes(self.kv_cache)
        cache[:, dst] = cache[:, src]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, heads*dim], k/v: [T, kv_heads*dim] -> [T, heads*dim]."""
        num_tokens = q.shape[0]
        metadata = _current_metadata()
        if metadata is None or self.kv_cache is None:
            return self._causal(q, k, v)
        kv = torch.cat((k, v), dim=-1).view(num_tokens, 2 * self.num_kv_heads, self.head_dim)
        return self._paged(q, kv, metadata)

    def forward_packed(
        self, qkv: torch.Tensor, rotary: RotaryEmbedding | None = None, rope: Rope | None = None
    ) -> torch.Tensor:
        """qkv: [T, (heads + 2*kv_heads)*dim], q | k | v as a fused projection emits them -> [T, heads*dim].

        K and V arrive side by side, so one copy writes both to the cache. With `rotary` and `rope`, q and
        k are rotated first (in place); on CUDA with a cache, by the kernel that also writes K and V."""
        q_size = self.num_heads * self.head_dim
        q, kv = qkv[:, :q_size], qkv[:, q_size:]
        metadata = _current_metadata()
        paged = metadata is not None and self.kv_cache is not None
        kv_heads = kv.view(qkv.shape[0], 2 * self.num_kv_heads, self.head_dim)
        if rope is not None and paged and qkv.is_cuda:
            from gptserve.kernels.rotary_kv_write import rotary_kv_write

            rotary_kv_write(
                qkv,
                rope.cos,
                rope.sin,
                self.num_heads,
                self.num_kv_heads,
                self.head_dim,
                rotary.interleaved,
                self._slots,
                metadata.slot_mapping,
            )
            return self._attend(q, kv_heads, metadata)
        if rope is not None:
            rotary.rotate_(qkv[:, : q_size + self.num_kv_heads * self.head_dim], rope)
        if not paged:
            return self._causal(q, *kv.chunk(2, dim=-1))
        return self._paged(q, kv_heads, metadata)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> torch.Tensor:
        # q: [B, H, Lq, D], k/v: [B, Hkv, Lk, D]
        if self.softcap is not None:
            return self._softcapped(q, k, v, **kw)
        if self.sliding_window is not None and kw.pop("is_causal", False):
            kw["attn_mask"] = _chunk_causal_mask(q.shape[-2], k.shape[-2], q.device, self.sliding_window)
        return F.scaled_dot_product_attention(
            q, k, v, scale=self.scale, enable_gqa=self.num_kv_heads != self.num_heads, **kw
        )

    def _softcapped(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        is_causal: bool = False,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`_sdpa` with soft-capped scores, written out as transformers' eager attention computes it:
        scores in the activation dtype, capped, masked, softmax in float32."""
        group = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        if is_causal:
            attn_mask = _chunk_causal_mask(q.shape[-2], k.shape[-2], q.device, self.sliding_window)
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)

    def _causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Plain causal attention over the input, no cache: q [T, heads*dim], k/v [T, kv_heads*dim]."""
        num_tokens, dim = q.shape[0], self.head_dim
        q, k, v = (x.reshape(num_tokens, -1, dim).transpose(0, 1)[None] for x in (q, k, v))
        return self._sdpa(q, k, v, is_causal=True)[0].transpose(0, 1).reshape(num_tokens, -1)

    def _paged(self, q: torch.Tensor, kv: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q [T, heads*dim] and the new kv [T, 2*kv_heads, dim]: write kv to the cache, then attend."""
        if kv.is_cuda:  # skips negative slots, the padding rows of a CUDA-graph batch
            from gptserve.kernels.kv_cache_write import write_kv

            write_kv(kv, self._slots, meta.slot_mapping)
        else:
            new = kv.transpose(0, 1).to(self._slots.dtype)
            _bytes(self._slots).index_copy_(1, meta.slot_mapping, _bytes(new))
        return self._attend(q, kv, meta)

    def _attend(self, q: torch.Tensor, kv: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Attention of q [T, heads*dim] over the cache, which already holds this step's kv."""
        num_tokens, nd = q.shape[0], meta.num_decode_tokens
        if nd == num_tokens:
            return self._decode(q, meta)
        out = torch.empty_like(q)
        if nd:
            out[:nd] = self._decode(q[:nd], meta)
        if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            prefill = self._prefill_varlen if self.softcap is None else self._prefill_softcapped
            out[nd:] = prefill(q[nd:], kv[nd:], meta.varlen_prefill())
            return out
        hkv, dim = self.num_kv_heads, self.head_dim
        for chunk in meta.prefills:
            s, n = chunk.query_start, chunk.query_len
            qc = q[s : s + n].view(n, -1, dim).transpose(0, 1)[None]
            if chunk.context_len == n:  # nothing cached before this chunk: attend to its own tokens
                ctx = kv[s : s + n].transpose(0, 1)
                o = self._sdpa(qc, ctx[None, :hkv], ctx[None, hkv:], is_causal=True)
            else:
                ctx = self._slots.index_select(1, chunk.context_slots).to(q.dtype)  # [2*Hkv, L, D]
                mask = _chunk_causal_mask(n, chunk.context_len, q.device, self.sliding_window)
                o = self._sdpa(qc, ctx[None, :hkv], ctx[None, hkv:], attn_mask=mask)
            out[s : s + n] = o[0].transpose(0, 1).reshape(n, -1)
        return out

    def _prefill_varlen(self, q: torch.Tensor, kv: torch.Tensor, layout: VarlenPrefill) -> torch.Tensor:
        """CUDA, half precision: every prefill chunk in one FlashAttention varlen call (causal, aligned to
        the end of each context, so a chunk after a cached prefix sees the prefix and its own past).
        q [Tq, heads*dim] and kv [Tq, 2*kv_heads, dim] are the packed chunks' new tokens."""
        hkv = self.num_kv_heads
        # FlashAttention's window: query i (aligned to its context's end at position p) sees keys
        # p - left .. p + right, so left = W - 1 keeps p - W < k <= p.
        window = {}
        if self.sliding_window is not None:
            window = {"window_size_left": self.sliding_window - 1, "window_size_right": 0}
        if layout.context_slots is None:
            keys, values = kv[:, :hkv], kv[:, hkv:]
        else:  # K/V of whole contexts, read back from the cache (already holding this step's tokens)
            ctx = _bytes(self._slots).index_select(1, layout.context_slots).view(self._slots.dtype)
            ctx = ctx.transpose(0, 1).to(q.dtype).contiguous()
            keys, values = ctx[:, :hkv], ctx[:, hkv:]
        out = torch.ops.aten._flash_attention_forward(
            q.view(q.shape[0], self.num_heads, self.head_dim),
            keys,
            values,
            layout.cu_queries,
            layout.cu_keys,
            layout.max_query_len,
            layout.max_key_len,
            0.0,
            True,
            False,
            scale=self.scale,
            **window,
        )[0]
        return out.view(q.shape[0], -1)

    def _prefill_softcapped(self, q: torch.Tensor, kv: torch.Tensor, layout: VarlenPrefill) -> torch.Tensor:
        """`_prefill_varlen` with soft-capped scores, which FlashAttention's call cannot apply: one masked
        product over every chunk's queries and keys, the block-diagonal causal mask built on the device
        from the varlen offsets (so a captured prefill graph replays it). Its memory grows with the square
        of the step's prefill tokens."""
        hkv, dim, device = self.num_kv_heads, self.head_dim, q.device
        if layout.context_slots is None:
            keys, values = kv[:, :hkv], kv[:, hkv:]
        else:
            ctx = _bytes(self._slots).index_select(1, layout.context_slots).view(self._slots.dtype)
            ctx = ctx.transpose(0, 1).to(q.dtype)
            keys, values = ctx[:, :hkv], ctx[:, hkv:]
        cu_q, cu_k = layout.cu_queries.long(), layout.cu_keys.long()
        q_index = torch.arange(q.shape[0], device=device)
        k_index = torch.arange(keys.shape[0], device=device)
        q_seq = torch.searchsorted(cu_q[1:], q_index, right=True)
        k_seq = torch.searchsorted(cu_k[1:], k_index, right=True)
        cached = (cu_k[1:] - cu_k[:-1]) - (cu_q[1:] - cu_q[:-1])  # each chunk's prefix already in the cache
        q_pos = q_index - cu_q[q_seq] + cached[q_seq]
        k_pos = k_index - cu_k[k_seq]
        mask = (q_seq[:, None] == k_seq[None, :]) & (k_pos[None, :] <= q_pos[:, None])
        if self.sliding_window is not None:
            mask &= k_pos[None, :] > q_pos[:, None] - self.sliding_window
        qh = q.view(q.shape[0], self.num_heads, dim).transpose(0, 1)[None]
        o = self._softcapped(qh, keys.transpose(0, 1)[None], values.transpose(0, 1)[None], attn_mask=mask)
        return o[0].transpose(0, 1).reshape(q.shape[0], -1)

    def _decode(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """One query per sequence, q [B, heads*dim] -> [B, heads*dim].

        Two batched matmuls over (KV head, sequence) pairs: the query heads that share a KV head form the
        rows of one small matrix, so K/V are never repeated for GQA, and each pair's gathered keys are
        one contiguous matrix. For one query this costs far less than a fused attention kernel's set-up.
        It runs in float32: CPU half-precision batched matmuls of these thin shapes cost several times
        more than converting the gathered K/V and using float32 BLAS.
        """
        b = q.shape[0]
        if q.is_cuda:  # the Triton paged-attention kernel reads the blocks in place
            from gptserve.kernels.paged_attention import paged_attention_decode

            q3 = q.view(b, self.num_heads, self.head_dim)
            lens = meta.decode_lens_tensor()
            out = paged_attention_decode(
                q3,
                self.kv_cache,
                meta.decode_blocks,
                lens,
                self.scale,
                arrivals=self._arrivals,
                softcap=self.softcap,
                sliding_window=self.sliding_window,
            )
            return out.view(b, -1)
        hkv, group, dim = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        num_blocks, block_size = self.kv_cache.shape[1:3]
        rows = meta.decode_gather_rows(hkv, num_blocks)
        width = meta.decode_blocks.shape[1] * block_size
        kv = self._rows.index_select(0, rows).float().view(2, hkv * b, width, dim)
        qg = q.view(b, hkv, group, dim)
        qg = qg.view(hkv, group, dim) if b == 1 else qg.transpose(0, 1).reshape(hkv * b, group, dim)
        bias = meta.decode_bias(hkv, block_size, self.sliding_window)
        if self.softcap is None:
            scores = torch.baddbmm(bias, qg.float(), kv[0].transpose(1, 2), alpha=self.scale)  # [Hkv*B, G, L]
        else:
            scores = torch.bmm(qg.float(), kv[0].transpose(1, 2)) * self.scale
            scores = torch.tanh(scores / self.softcap) * self.softcap + bias
        out = torch.bmm(torch.softmax(scores, dim=-1), kv[1])  # [Hkv*B, G, D]
        if b > 1:
            out = out.view(hkv, b, group, dim).transpose(0, 1)
        return out.reshape(b, -1).to(q.dtype)


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _bytes(cache: torch.Tensor) -> torch.Tensor:
    """An fp8 cache seen as bytes, for the copies PyTorch does not implement for float8 types."""
    return cache.view(torch.uint8) if cache.dtype in FP8_DTYPES else cache


def _chunk_causal_mask(
    query_len: int, context_len: int, device: torch.device, sliding_window: int | None = None
) -> torch.Tensor:
    """Query i of a chunk sits at position p = context_len - query_len + i and sees keys up to it; with a
    sliding window W, only keys after p - W (transformers' sliding_window_overlay)."""
    q_pos = torch.arange(context_len - query_len, context_len, device=device)[:, None]
    k_pos = torch.arange(context_len, device=device)[None, :]
    if sliding_window is None:
        return k_pos <= q_pos
    return (k_pos <= q_pos) & (k_pos > q_pos - sliding_window)
