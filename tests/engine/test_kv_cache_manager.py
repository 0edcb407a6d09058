"""KVCacheManager on its own (no model): block allocation and free, reference counts and copy-on-write of
forked sequences, prefix-cache hits, and the eviction order of cached free blocks."""

from __future__ import annotations

import pytest

from gptserve.engine.kv_cache_manager import KVCacheManager
from gptserve.engine.sequence import Sequence

BS = 4  # tokens a block


def seq_of(tokens: list[int] | range) -> Sequence:
    tokens = list(tokens)
    return Sequence(tokens, len(tokens))


def compute(kv: KVCacheManager, seq: Sequence) -> list[tuple[int, int]]:
    """Allocate and "compute" every uncomputed token of `seq` the way a step does: room for the tokens,
    then the computed count advanced and the full blocks offered to the prefix cache."""
    copies: list[tuple[int, int]] = []
    n = seq.num_uncomputed_tokens
    assert kv.can_allocate(kv.blocks_needed(seq, n))
    kv.allocate(seq, n, copies)
    seq.num_computed_tokens += n
    kv.cache_full_blocks(seq)
    return copies


def assert_all_free(kv: KVCacheManager) -> None:
    assert kv.num_free_blocks == kv.num_blocks
    assert kv.ref_counts == [0] * kv.num_blocks
    assert kv.usage == 0.0


# ------------------------------------------------------------------------------------ allocate and free
def test_allocate_takes_whole_blocks_and_free_returns_every_one():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a, b = seq_of(range(10)), seq_of(range(100, 104))
    assert kv.blocks_needed(a, 10) == 3 and kv.blocks_needed(b, 4) == 1
    copies: list[tuple[int, int]] = []
    kv.allocate(a, 10, copies)
    kv.allocate(b, 4, copies)
    assert copies == []
    assert len(a.block_ids) == 3 and len(b.block_ids) == 1
    assert not set(a.block_ids) & set(b.block_ids)
    assert all(kv.ref_counts[blk] == 1 for blk in a.block_ids + b.block_ids)
    assert kv.num_free_blocks == 4 and kv.usage == pytest.approx(0.5)

    a.num_computed_tokens = 10
    assert kv.blocks_needed(a, 2) == 0  # the third block has room for two more
    assert kv.blocks_needed(a, 3) == 1
    kv.allocate(a, 3, copies)
    assert len(a.block_ids) == 4 and kv.num_free_blocks == 3

    kv.free(a)
    assert a.block_ids == [] and a.block_hashes == [] and a.num_computed_tokens == 0
    kv.free(b)
    assert_all_free(kv)


def test_can_allocate_counts_free_blocks():
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    seq = seq_of(range(9))
    assert kv.blocks_needed(seq, 9) == 3 and kv.can_allocate(3) and not kv.can_allocate(4)
    kv.allocate(seq, 9, [])
    assert kv.num_free_blocks == 0 and not kv.can_allocate(1) and kv.can_allocate(0)


# -------------------------------------------------------------------------------------- copy-on-write
def test_fork_shares_blocks_and_a_write_into_a_shared_partial_block_copies_it():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    parent = seq_of(range(6))  # one full block and a partial one (2 of 4 slots)
    compute(kv, parent)
    full, partial = parent.block_ids
    child = parent.fork(1, None)
    kv.share(child)
    assert child.block_ids == [full, partial] and child.num_computed_tokens == 6
    assert kv.ref_counts[full] == kv.ref_counts[partial] == 2
    free_before = kv.num_free_blocks

    # Each sampled a different token: the next write lands in the shared partial block.
    parent.token_ids.append(50)
    child.token_ids.append(51)
    assert kv.blocks_needed(parent, 1) == 1  # a copy of the partial block
    copies: list[tuple[int, int]] = []
    kv.allocate(parent, 1, copies)
    assert len(copies) == 1
    src, dst = copies[0]
    assert src == partial and dst not in (full, partial)
    assert parent.block_ids == [full, dst]
    assert kv.ref_counts[partial] == 1 and kv.ref_counts[dst] == 1 and kv.ref_counts[full] == 2

    # The other sequence is now the partial block's only holder: it writes in place, no copy.
    assert kv.blocks_needed(child, 1) == 0
    kv.allocate(child, 1, copies)
    assert len(copies) == 1 and child.block_ids == [full, partial]
    assert kv.num_free_blocks == free_before - 1

    kv.free(parent)
    assert kv.ref_counts[full] == 1 and kv.ref_counts[dst] == 0
    kv.free(child)
    assert_all_free(kv)


def test_fork_at_a_block_boundary_needs_no_copy():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    parent = seq_of(range(8))  # two full blocks
    compute(kv, parent)
    child = parent.fork(1, None)
    kv.share(child)
    parent.token_ids.append(50)
    child.token_ids.append(51)
    copies: list[tuple[int, int]] = []
    for seq in (parent, child):
        assert kv.blocks_needed(seq, 1) == 1  # a fresh block of its own
        kv.allocate(seq, 1, copies)
    assert copies == []
    assert parent.block_ids[:2] == child.block_ids[:2] and parent.block_ids[2] != child.block_ids[2]
    kv.free(parent)
    kv.free(child)
    assert_all_free(kv)


# --------------------------------------------------------------------------------------- prefix cache
def test_same_prompt_matches_the_full_blocks_cached_by_the_first():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    prompt = list(range(200, 210))  # two full blocks and two tokens
    first = seq_of(prompt)
    assert kv.match_prefix(first) == 0  # nothing cached yet
    compute(kv, first)
    assert len(first.block_hashes) == 2  # the partial block is not cached

    second = seq_of(prompt)
    assert kv.match_prefix(second) == 8
    assert second.block_ids == first.block_ids[:2] and second.num_computed_tokens == 8
    assert second.block_hashes == first.block_hashes
    assert all(kv.ref_counts[blk] == 2 for blk in second.block_ids)
    assert kv.prefix_queries == 0  # the scheduler counts a lookup once it admits the request
    assert compute(kv, second) == []  # only the two last tokens are computed, into a block of its own
    assert second.block_ids[2] != first.block_ids[2]
    prefix_blocks = second.block_ids[:2]

    kv.free(first)
    kv.free(second)
    assert_all_free(kv)

    third = seq_of(prompt)  # the blocks are free but still cached
    assert kv.match_prefix(third) == 8 and third.block_ids == prefix_blocks
    assert kv.num_free_blocks == kv.num_blocks - 2
    kv.free(third)
    assert_all_free(kv)


def test_last_token_is_always_computed():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    prompt = list(range(8))  # exactly two full blocks
    compute(kv, seq_of(prompt))
    again = seq_of(prompt)
    assert kv.match_prefix(again) == 4  # one block: the last token's logits are needed
    assert again.num_uncomputed_tokens == 4


def test_prefix_match_is_chained_over_every_earlier_token():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    prompt = list(range(300, 313))  # three full blocks
    compute(kv, seq_of(prompt))
    shares_first_block = prompt[:4] + [0, 0, 0, 0] + prompt[8:]
    assert kv.match_prefix(seq_of(shares_first_block)) == 4
    # The same later blocks after a different first block are not the same prefix.
    differs_in_first_block = [0] + prompt[1:]
    assert kv.match_prefix(seq_of(differs_in_first_block)) == 0


def test_prefix_caching_off_matches_nothing():
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    prompt = list(range(9))
    compute(kv, seq_of(prompt))
    assert kv.match_prefix(seq_of(prompt)) == 0


def test_reset_prefix_cache_forgets_cached_blocks():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    prompt = list(range(9))
    seq = seq_of(prompt)
    compute(kv, seq)
    kv.free(seq)
    kv.reset_prefix_cache()
    assert kv.match_prefix(seq_of(prompt)) == 0
    assert_all_free(kv)


# ------------------------------------------------------------------------------------------- eviction
def test_full_cache_evicts_the_least_recently_freed_cached_block_first():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    prompts = {name: list(range(base, base + 4)) for name, base in (("a", 10), ("b", 20), ("c", 30))}
    seqs = {name: seq_of(p) for name, p in prompts.items()}
    for seq in seqs.values():
        compute(kv, seq)  # one full, cached block each
    block = {name: seq.block_ids[0] for name, seq in seqs.items()}
    for name in ("b", "a", "c"):  # b is freed first, so it is the least recently freed
        kv.free(seqs[name])
    assert_all_free(kv)

    # A new prompt of two blocks takes the never-used block, then b's: b is evicted, a and c stay.
    newcomer = seq_of(range(40, 48))
    compute(kv, newcomer)
    assert block["b"] in newcomer.block_ids and block["a"] not in newcomer.block_ids
    assert kv.num_free_blocks == 2

    def matched(name: str) -> int:  # the prompt and one more token, so its full block can match
        probe = seq_of(prompts[name] + [0])
        hit = kv.match_prefix(probe)
        kv.free(probe)
        return hit

    assert matched("b") == 0
    assert matched("a") == 4 and matched("c") == 4


def test_a_freed_sequence_loses_its_tail_blocks_first():
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    prompt = list(range(12))  # three full blocks, all cached
    seq = seq_of(prompt)
    compute(kv, seq)
    head, middle, tail = seq.block_ids
    kv.free(seq)

    other = seq_of(range(100, 104))
    compute(kv, other)
    assert other.block_ids == [tail]
    probe = seq_of(prompt + [0])
    assert kv.match_prefix(probe) == 8 and probe.block_ids == [head, middle]  # the longest prefix survives
    kv.free(probe)
    kv.free(other)
    assert_all_free(kv)


def test_a_cached_free_block_matched_again_leaves_the_free_list():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    prompt = list(range(5))
    seq = seq_of(prompt)
    compute(kv, seq)
    cached = seq.block_ids[0]
    kv.free(seq)
    again = seq_of(prompt)
    assert kv.match_prefix(again) == 4 and again.block_ids == [cached]
    assert kv.num_free_blocks == 3 and kv.ref_counts[cached] == 1
    # Filling the rest of the cache must not hand out the block a live sequence holds.
    filler = seq_of(range(50, 62))
    compute(kv, filler)
    assert cached not in filler.block_ids and kv.num_free_blocks == 0
    kv.free(again)
    kv.free(filler)
    assert_all_free(kv)
