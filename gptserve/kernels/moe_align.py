"""Token (token, choice) pairs sorted by expert and padded to whole blocks, for the grouped MoE GEMM.

A routing of T tokens to `top_k` experts each makes T * top_k pairs; pair p is token p // top_k's choice
p % top_k. The fused-MoE kernel (`gptserve.kernels.fused_moe`) gives each program BLOCK_M rows of one
expert, so the pairs are grouped by expert and each group is padded up to a multiple of BLOCK_M with the
sentinel T * top_k (a row the kernel neither reads nor writes). Everything stays on the device and the
buffer sizes depend only on T, top_k, the expert count and BLOCK_M, so a decode step using it can be
captured in a CUDA graph: unused trailing blocks get expert -1 and lie past `num_padded`.
"""

from __future__ import annotations

import torch


def max_padded_pairs(num_pairs: int, num_experts: int, block_m: int) -> int:
    """An upper bound on the padded length, a multiple of `block_m`: every expert may waste block_m - 1."""
    bound = num_pairs + num_experts * (block_m - 1)
    return -(-bound // block_m) * block_m


def moe_align(
    ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted_pairs [P] int32, block_experts [P / block_m] int32, num_padded [1] int32) for expert ids
    [T, top_k]: pair indices grouped by expert (ascending pair order within an expert) and padded with
    T * top_k to whole blocks; the expert of each block (-1 past the last used one); the used length."""
    flat = ids.reshape(-1).long()
    num_pairs = flat.numel()
    length = max_padded_pairs(num_pairs, num_experts, block_m)
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    order = flat.argsort(stable=True)
    experts_in_order = flat[order]
    rank = torch.arange(num_pairs, device=ids.device) - (counts.cumsum(0) - counts)[experts_in_order]
    destination = (padded_end - padded)[experts_in_order] + rank
    sorted_pairs = torch.full((length,), num_pairs, dtype=torch.int32, device=ids.device)
    sorted_pairs[destination] = order.to(torch.int32)
    block_starts = torch.arange(0, length, block_m, device=ids.device)
    block_experts = torch.searchsorted(padded_end, block_starts, right=True)
    num_padded = padded_end[-1:]
    block_experts = torch.where(block_starts < num_padded, block_experts, -1).to(torch.int32)
    return sorted_pairs, block_experts, num_padded.to(torch.int32)
