"""Decode attention over the paged KV cache: one query token per sequence, its keys and values read
through the sequence's block table.

The cache is the attention layer's one tensor per layer, [2 * num_kv_heads, num_blocks, block_size,
head_dim], K heads then V heads. One program handles one (sequence, query head, split) triple: it walks
its share of the context in tiles of `BLOCK_N` tokens, looks up each token's block in the block table,
and keeps an online softmax in float32, so K and V are read once, straight from their blocks, with no
gather copy. When sequences x heads alone would leave most multiprocessors idle (small batches), the
context is split `SPLITS` ways (flash-decoding): each split writes its running max, sum and unnormalised
output, and the split of each (sequence, head) that finishes last, counted by an atomic per pair,
combines them (a second kernel does when the caller has no counters: one kernel fewer per layer saves
its launch, a few microseconds of a 5 ms batch-1 step). The grid depends only on the batch and head
counts, never on context lengths, which the kernels read from device tensors; so a decode step calling
this can be captured in a CUDA graph. A row with context length 0 (a padding row) gets zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(
    out_ptr,
    part_ml_ptr,
    part_acc_ptr,
    arrivals_ptr,
    q_ptr,
    kv_ptr,
    tables_ptr,
    lens_ptr,
    scale,
    softcap,
    window,
    stride_qb,
    stride_qh,
    stride_ob,
    stride_oh,
    stride_kv_head,
    stride_kv_block,
    stride_kv_slot,
    stride_tb,
    num_heads,
    num_kv_heads,
    GROUP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr,
    LAST_COMBINES: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    kv_head = head // GROUP
    context_len = tl.load(lens_ptr + seq).to(tl.int32)
    # With a sliding window (window > 0) only the last `window` tokens are read: the splits share them
    # and the blocks before them are never loaded.
    lo = tl.where(window > 0, tl.maximum(context_len - window, 0), 0)
    tiles_per_split = tl.cdiv(tl.cdiv(context_len - lo, BLOCK_N), SPLITS)
    first = lo + split * tiles_per_split * BLOCK_N
    last = tl.minimum(first + tiles_per_split * BLOCK_N, context_len)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    q = tl.load(q_ptr + seq * stride_qb + head * stride_qh + d, mask=d_mask, other=0.0).to(tl.float32)
    q = q * scale
    k_base = kv_ptr + kv_head * stride_kv_head
    v_base = kv_ptr + (num_kv_heads + kv_head) * stride_kv_head
    table = tables_ptr + seq * stride_tb
    m_i = tl.full([], float("-inf"), tl.float32)
    l_i = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(first, last, BLOCK_N):
        t = start + offs_n
        t_mask = t < last
        block = tl.load(table + t // BLOCK_SIZE, mask=t_mask, other=0).to(tl.int64)
        rows = block * stride_kv_block + (t % BLOCK_SIZE).to(tl.int64) * stride_kv_slot
        mask = t_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + rows[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_base + rows[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1)
        if SOFTCAP:  # softcap * tanh(s / softcap), tanh(x) = 1 - 2 / (exp(2x) + 1)
            s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
        s = tl.where(t_mask, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    if SPLITS == 1:
        out = tl.where(l_i > 0, acc / tl.maximum(l_i, 1e-30), 0.0)
        dst = out_ptr + seq * stride_ob + head * stride_oh + d
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=d_mask)
    else:
        part = (seq * num_heads + head) * SPLITS + split
        tl.store(part_ml_ptr + 2 * part, m_i)
        tl.store(part_ml_ptr + 2 * part + 1, l_i)
        tl.store(part_acc_ptr + part * BLOCK_D + d, acc)
        if LAST_COMBINES:
            # Every thread's stores are done before one thread counts this split in (release, device
            # scope); the split that arrives last reads the others' parts past the L1 cache, combines
            # them and resets its counter for the next call.
            tl.debug_barrier()
            counter = arrivals_ptr + seq * num_heads + head
            arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLITS - 1:
                _combine(out_ptr, part_ml_ptr, part_acc_ptr, seq, head, stride_ob, stride_oh, num_heads,
                         HEAD_DIM, BLOCK_D, SPLITS, ".cg")  # fmt: skip
                tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")


@triton.jit
def _combine(
    out_ptr,
    part_ml_ptr,
    part_acc_ptr,
    seq,
    head,
    stride_ob,
    stride_oh,
    num_heads,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLITS: tl.constexpr,
    CACHE: tl.constexpr,
):
    """Weigh each split's output by its share of the softmax sum and write the normalised result."""
    parts = (seq * num_heads + head) * SPLITS + tl.arange(0, SPLITS)
    m = tl.load(part_ml_ptr + 2 * parts, cache_modifier=CACHE)
    l = tl.load(part_ml_ptr + 2 * parts + 1, cache_modifier=CACHE)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    weight = tl.where(l > 0, tl.exp(m - m_max), 0.0)
    d = tl.arange(0, BLOCK_D)
    acc = tl.load(part_acc_ptr + parts[:, None] * BLOCK_D + d[None, :], cache_modifier=CACHE)
    total = tl.sum(weight * l, axis=0)
    out = tl.sum(weight[:, None] * acc, axis=0)
    out = tl.where(total > 0, out / tl.maximum(total, 1e-30), 0.0)
    dst = out_ptr + seq * stride_ob + head * stride_oh + d
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@triton.jit
def _combine_splits_kernel(
    out_ptr,
    part_ml_ptr,
    part_acc_ptr,
    stride_ob,
    stride_oh,
    num_heads,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLITS: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    _combine(
        out_ptr, part_ml_ptr, part_acc_ptr, seq, head, stride_ob, stride_oh, num_heads, HEAD_DIM, BLOCK_D,
        SPLITS, "",
    )  # fmt: skip


def num_splits(batch: int, num_heads: int, device: torch.device) -> int:
    """Context splits per (sequence, head): enough programs for about two per multiprocessor, at most 16."""
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    splits = 1
    while splits < 16 and batch * num_heads * splits * 2 <= target:
        splits *= 2
    return splits


def _launch(
    block_d: int, splits: int, element_size: int, block_n: int | None, num_warps: int | None
) -> tuple[int, int]:
    """Tokens per tile and warps per program, unless given. Measured on an H200 (fp16, 16-token blocks):
    with many sequences, small tiles and two warps keep enough programs in flight to read the cache near
    full bandwidth (256-wide heads, 512 sequences of 192 tokens: 16-token tiles 3.7 TB/s, 32-token tiles
    with four warps 2.2 TB/s; 64- and 128-wide heads do best with 32-token tiles); a context split over
    programs (few sequences) reads more per program (128-wide heads, 4 sequences of 2,048 tokens:
    64-token tiles with four warps 2.0 TB/s against 1.6). A one-byte (fp8) cache on an H100 does best with
    32-token tiles and one warp (256-wide heads, 512 sequences of 192 tokens: 2.85 TB/s against 1.45 with
    the fp16 choice; 128-wide heads, 256 sequences of 512 tokens: 2.97 against 2.15)."""
    if splits > 1 and block_d <= 128:
        default_n, default_warps = 64, 4
    elif element_size == 1:
        default_n, default_warps = 32, 1
    else:
        default_n, default_warps = (16 if block_d >= 256 else 32), 2
    return block_n or default_n, num_warps or default_warps


def arrival_counters(device: torch.device) -> torch.Tensor:
    """Zeroed counters for `paged_attention_decode(arrivals=...)`: one per (sequence, head) of any batch
    that `num_splits` splits (batch x heads at most half the multiprocessors), each back at zero after
    every call. A caller keeps its own: calls that share counters must not run concurrently."""
    count = torch.cuda.get_device_properties(device).multi_processor_count
    return torch.zeros(count, dtype=torch.int32, device=device)


def paged_attention_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    arrivals: torch.Tensor | None = None,
    splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Attention of one query per sequence over its cached context.

    q [B, heads, head_dim]; kv_cache [2 * kv_heads, num_blocks, block_size, head_dim] (K heads then V
    heads); block_tables [B, max_blocks] (int32 or int64); context_lens [B] (tokens each query attends
    to, 0 for a padding row). With `arrivals` (`arrival_counters`, at least B x heads of them) the last
    split of each (sequence, head) combines the splits, else a second kernel does. `splits` (a power of
    two) overrides `num_splits`; `block_n` (tokens per tile), `num_warps` and `num_stages` override the
    launch configuration. With `softcap`, each score s (already scaled) becomes softcap * tanh(s / softcap)
    (Gemma 2's logit soft-capping). With `sliding_window` W, a query reads only the last W tokens of
    its context (Mistral), a per-layer constant, so a captured graph stays valid. Returns [B, heads,
    head_dim] in q's dtype.
    """
    batch, num_heads, head_dim = q.shape
    two_kv_heads, _, block_size, cache_dim = kv_cache.shape
    num_kv_heads = two_kv_heads // 2
    if cache_dim != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"q {tuple(q.shape)} does not fit the cache {tuple(kv_cache.shape)}")
    if q.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        raise ValueError("q and the cache need a contiguous last dimension")
    if out is None:
        out = torch.empty_like(q)
    splits = splits or num_splits(batch, num_heads, q.device)
    block_d = triton.next_power_of_2(head_dim)
    block_n, num_warps = _launch(block_d, splits, kv_cache.element_size(), block_n, num_warps)
    stages = {} if num_stages is None else {"num_stages": num_stages}
    parts = batch * num_heads * splits if splits > 1 else 1
    part_ml = torch.empty(2 * parts, dtype=torch.float32, device=q.device)
    part_acc = torch.empty(parts * block_d, dtype=torch.float32, device=q.device)
    last_combines = splits > 1 and arrivals is not None and arrivals.numel() >= batch * num_heads
    _paged_decode_kernel[(batch, num_heads, splits)](
        out,
        part_ml,
        part_acc,
        arrivals if last_combines else part_ml,
        q,
        kv_cache,
        block_tables,
        context_lens,
        scale,
        softcap or 1.0,
        sliding_window or 0,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        block_tables.stride(0),
        num_heads,
        num_kv_heads,
        GROUP=num_heads // num_kv_heads,
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        SPLITS=splits,
        LAST_COMBINES=last_combines,
        SOFTCAP=softcap is not None,
        num_warps=num_warps,
        **stages,
    )
    if splits > 1 and not last_combines:
        _combine_splits_kernel[(batch, num_heads)](
            out,
            part_ml,
            part_acc,
            out.stride(0),
            out.stride(1),
            num_heads,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            SPLITS=splits,
            num_warps=4,
        )
    return out


def paged_attention_decode_reference(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    softcap: float | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Plain-PyTorch `paged_attention_decode`, one sequence at a time, softmax in float32."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads, block_size = kv_cache.shape[0] // 2, kv_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.zeros_like(q)
    for b in range(batch):
        n = int(context_lens[b])
        if n == 0:
            continue
        blocks = block_tables[b, : (n - 1) // block_size + 1].long()
        ctx = kv_cache[:, blocks].reshape(2 * num_kv_heads, -1, head_dim)[:, :n].float()  # [2*Hkv, n, D]
        if sliding_window is not None:
            ctx = ctx[:, max(n - sliding_window, 0) :]
        k = ctx[:num_kv_heads].repeat_interleave(group, dim=0)
        v = ctx[num_kv_heads:].repeat_interleave(group, dim=0)
        scores = torch.einsum("hd,hnd->hn", q[b].float() * scale, k)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        out[b] = torch.einsum("hn,hnd->hd", scores.softmax(dim=-1), v).to(q.dtype)
    return out
