"""Pairs sorted by expert and padded to blocks (plain PyTorch, runs everywhere): every (token, choice)
pair appears once, in a block of its own expert; padding is the sentinel; unused blocks are marked."""

from __future__ import annotations

import pytest
import torch

from gptserve.kernels.moe_align import max_padded_pairs, moe_align


@pytest.mark.parametrize(
    "tokens,top_k,experts,block_m", [(48, 2, 8, 16), (3, 2, 8, 16), (1, 2, 8, 64), (37, 4, 16, 16)]
)
def test_pairs_grouped_by_expert_in_whole_blocks(tokens, top_k, experts, block_m):
    g = torch.Generator().manual_seed(tokens * 31 + experts)
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    if tokens > 10:
        ids[: tokens // 2, 0] = 3  # skewed: expert 3 takes many pairs
    sorted_pairs, block_experts, num_padded = moe_align(ids, experts, block_m)
    num_pairs = tokens * top_k
    assert sorted_pairs.numel() == max_padded_pairs(num_pairs, experts, block_m)
    assert block_experts.numel() * block_m == sorted_pairs.numel()
    counts = torch.bincount(ids.flatten(), minlength=experts)
    expected_padded = int(((counts + block_m - 1) // block_m * block_m).sum())
    assert int(num_padded) == expected_padded
    flat = ids.flatten()
    used = sorted_pairs[:expected_padded]
    assert sorted(used[used < num_pairs].tolist()) == list(range(num_pairs))
    assert (sorted_pairs[expected_padded:] == num_pairs).all()
    for block, expert in enumerate(block_experts.tolist()):
        pairs = sorted_pairs[block * block_m : (block + 1) * block_m]
        real = pairs[pairs < num_pairs].long()
        if block * block_m >= expected_padded:
            assert expert == -1 and real.numel() == 0
        else:
            assert real.numel() > 0 and (flat[real] == expert).all()
            assert real.tolist() == sorted(real.tolist())
