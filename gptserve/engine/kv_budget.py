"""How many bytes the paged KV cache gets when `--kv-cache-memory` does not say, and how many one token
takes.

On CPU the budget is a fixed 1 GiB (host memory is shared with everything else). On a GPU the cache takes
what is left of `--gpu-memory-utilization` (0.9 by default, the fraction of the card this process may
use) once the weights are loaded, less the activations of the largest step the scheduler can build and
a reserve for CUDA graphs and the communication library. Every tensor-parallel rank holds the same
shard sizes, so rank 0's answer holds for all of them. A process that builds several engines (a model
repository with several LLMs) gives each a share of what is left, so the last one still finds room.
"""

from __future__ import annotations

import logging

import torch

from gptserve.config import ModelConfig
from gptserve.errors import GptServeError

logger = logging.getLogger(__name__)

GiB = 1 << 30
DEFAULT_CPU_KV_CACHE_BYTES = 1 * GiB
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
GRAPH_AND_COMM_RESERVE = 1 * GiB  # CUDA graph pools, NCCL buffers, cuBLAS workspaces


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype, world_size: int = 1) -> int:
    """Bytes of K and V that one token occupies across all layers, on each of `world_size` ranks."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * (config.num_kv_heads // world_size) * config.head_dim * elem


def activation_bytes(
    config: ModelConfig, dtype: torch.dtype, max_num_batched_tokens: int, max_num_seqs: int, world_size: int
) -> int:
    """An upper estimate of one step's live activations on one rank: the widest intermediates of a layer
    (fused q/k/v and the MLP's two intermediates) for every token of the step, a few hidden-state copies,
    and float32 logits for every sampled row, twice (the logits and the sampler's softmax)."""
    elem = torch.empty((), dtype=dtype).element_size()
    qkv = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim // world_size
    mlp = 3 * config.intermediate_size // world_size  # gate/up (or fc_in) outputs and the activation
    per_token = (qkv + mlp + 6 * config.hidden_size) * elem
    logits = 2 * max_num_seqs * config.vocab_size * 4
    return 2 * (max_num_batched_tokens * per_token + logits)


def gpu_kv_budget(
    device: torch.device,
    config: ModelConfig,
    dtype: torch.dtype,
    max_num_batched_tokens: int,
    max_num_seqs: int,
    world_size: int,
    utilization: float,
    share: float = 1.0,
) -> int:
    """Bytes for the KV cache on `device` (the weights must already be there); `share` of what is left
    when engines still to be built need the rest."""
    if not 0.0 < utilization <= 1.0:
        raise GptServeError(f"--gpu-memory-utilization must be in (0, 1], got {utilization}")
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    in_use = total - free  # this process's weights and context, and anything else on the card
    activations = activation_bytes(config, dtype, max_num_batched_tokens, max_num_seqs, world_size)
    budget = int(share * (int(utilization * total) - in_use - activations - GRAPH_AND_COMM_RESERVE))
    logger.info(
        "GPU memory: %.1f GiB total, %.1f GiB in use after loading, %.1f GiB kept for activations and "
        "%.1f GiB for graphs and communication: KV cache gets %.1f GiB (gpu_memory_utilization %.2f, "
        "share %.2f)",
        total / GiB,
        in_use / GiB,
        activations / GiB,
        GRAPH_AND_COMM_RESERVE / GiB,
        max(budget, 0) / GiB,
        utilization,
        share,
    )
    return max(budget, 0)
