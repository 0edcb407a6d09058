"""Paged KV-cache block accounting: reference counts, copy-on-write, prefix caching.

The cache is one allocation of `num_blocks` blocks of `block_size` token slots (the tensors live in
the model runner; this class only hands out block ids). A full, computed block is registered under a
hash chained over all tokens up to its end, so a later sequence with the same prefix reuses it.
Freed blocks keep their hash and stay reusable until they are evicted, least recently freed first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from gptserve.engine.sequence import Sequence


class KVCacheManager:
    """Hands out KV blocks to sequences and takes them back."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # eviction order
        self._block_hash: list[int | None] = [None] * num_blocks
        self._block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self._cached: dict[int, int] = {}  # block hash -> block id
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live sequences (cached-but-free blocks count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    def _take_free_block(self) -> int:
        block, _ = self._free.popitem(last=False)
        h = self._block_hash[block]
        if h is not None:
            if self._cached.get(h) == block:
                del self._cached[h]
            self._block_hash[block] = None
            self._block_tokens[block] = None
        self.ref_counts[block] = 1
        return block

    def _release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self._free[block] = None

    def _hash_blocks(self, seq: Sequence, num_full_blocks: int) -> list[tuple[int, tuple[int, ...]]]:
        """(chained hash, tokens) of the first `num_full_blocks` blocks, reusing hashes the seq holds."""
        bs = self.block_size
        out = []
        parent: int | None = None
        for i in range(num_full_blocks):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = seq.block_hashes[i] if i < len(seq.block_hashes) else hash((parent, tokens))
            out.append((h, tokens))
            parent = h
        return out

    def match_prefix(self, seq: Sequence) -> int:
        """Attach cached blocks covering the longest known prefix of a fresh sequence.

        At least one token is always left to compute, since its logits are needed. Returns the
        number of tokens found in the cache.
        """
        assert seq.num_computed_tokens == 0 and not seq.block_ids
        if not self.enable_prefix_caching:
            return 0
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hits: list[tuple[int, int]] = []
        for h, tokens in self._hash_blocks(seq, max_blocks):
            block = self._cached.get(h)
            if block is None or self._block_tokens[block] != tokens:
                break
            hits.append((block, h))
        for block, h in hits:
            if self.ref_counts[block] == 0:
                del self._free[block]
            self.ref_counts[block] += 1
            seq.block_ids.append(block)
            seq.block_hashes.append(h)
        seq.num_computed_tokens = len(hits) * self.block_size
        return seq.num_computed_tokens

    def count_prefix_lookup(self, num_tokens: int, num_hit: int) -> None:
        """Count one request's lookup in the prefix-cache statistics (once it has been admitted: a lookup
        given back for lack of blocks and repeated later counts once)."""
        if self.enable_prefix_caching:
            self.prefix_queries += num_tokens
            self.prefix_hits += num_hit

    def _needs_copy(self, seq: Sequence) -> bool:
        """Would the next write land in a partially filled block shared with another sequence?"""
        if seq.num_computed_tokens % self.block_size == 0:
            return False
        return self.ref_counts[seq.block_ids[seq.num_computed_tokens // self.block_size]] > 1

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Free blocks that `allocate(seq, num_new_tokens)` would take."""
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(total - len(seq.block_ids), 0) + int(self._needs_copy(seq))

    def blocks_needed_for(self, plan: Iterable[tuple[Sequence, int]]) -> int:
        """Free blocks that allocating each (sequence, new tokens) of `plan` in turn would take. A shared
        partial block is copied for each sequence of the plan that writes into it, except that the last
        holder of the block writes in place."""
        needed = 0
        writers: dict[int, int] = {}  # shared partial block -> sequences of the plan writing into it
        for seq, num_new_tokens in plan:
            total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
            needed += max(total - len(seq.block_ids), 0)
            if self._needs_copy(seq):
                block = seq.block_ids[seq.num_computed_tokens // self.block_size]
                writers[block] = writers.get(block, 0) + 1
        for block, count in writers.items():
            needed += count - (count == self.ref_counts[block])
        return needed

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, seq: Sequence, num_new_tokens: int, copies: list[tuple[int, int]]) -> None:
        """Give `seq` room for `num_new_tokens` more tokens; shared partial blocks are copied first
        (the (src, dst) pair is appended to `copies` for the model runner)."""
        if self._needs_copy(seq):
            i = seq.num_computed_tokens // self.block_size
            src, dst = seq.block_ids[i], self._take_free_block()
            copies.append((src, dst))
            self._release(src)
            seq.block_ids[i] = dst
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        while len(seq.block_ids) < total:
            seq.block_ids.append(self._take_free_block())

    def share(self, seq: Sequence) -> None:
        """Take a reference on every block of `seq` (a fork now holds them too)."""
        for block in seq.block_ids:
            self.ref_counts[block] += 1

    def free(self, seq: Sequence) -> None:
        """Return the blocks of a finished or preempted sequence; it must recompute from scratch."""
        for block in reversed(seq.block_ids):  # tail blocks are evicted first
            self._release(block)
        seq.block_ids = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks `seq` has completely computed so later prompts can reuse them."""
        num_full = seq.num_computed_tokens // self.block_size
        if len(seq.block_hashes) >= num_full:
            return
        hashed = self._hash_blocks(seq, num_full)
        for i in range(len(seq.block_hashes), num_full):
            h, tokens = hashed[i]
            seq.block_hashes.append(h)
            block = seq.block_ids[i]
            if self.enable_prefix_caching and self._block_hash[block] is None and h not in self._cached:
                self._cached[h] = block
                self._block_hash[block] = h
                self._block_tokens[block] = tokens

    def reset_prefix_cache(self) -> None:
        """Forget every cached block hash (free blocks stay free)."""
        self._cached.clear()
        self._block_hash = [None] * self.num_blocks
        self._block_tokens = [None] * self.num_blocks
