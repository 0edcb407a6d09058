"""Turns engine options and a model's configuration into the `EngineConfig` the engine runs with, the KV
cache sized in blocks: an explicit block count, an explicit byte budget, or the default budget of the
device (`kv_budget`)."""

from __future__ import annotations

import logging

import torch

from gptserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from gptserve.engine.engine_options import EngineOptions, async_scheduling, kv_cache_dtype, parse_bytes
from gptserve.engine.kv_budget import DEFAULT_CPU_KV_CACHE_BYTES, GiB, gpu_kv_budget, kv_bytes_per_token
from gptserve.errors import GptServeError
from gptserve.parallel import parallel_state

logger = logging.getLogger(__name__)


def engine_config(
    opts: EngineOptions, model_config: ModelConfig, device: torch.device, dtype: torch.dtype
) -> EngineConfig:
    """The engine's configuration on `device` with activations in `dtype`. On CUDA without a budget the
    weights must already be loaded: the cache takes what they leave. Under tensor parallelism the sizes
    are each rank's (its share of the KV heads)."""
    max_model_len = opts.max_model_len or model_config.max_position_embeddings
    if max_model_len > model_config.max_position_embeddings and model_config.architecture == "gpt2":
        raise GptServeError(
            f"max_model_len {max_model_len} exceeds GPT-2's "
            f"{model_config.max_position_embeddings} learned positions"
        )
    kv_dtype = kv_cache_dtype(opts.kv_cache_dtype, dtype, device)
    block_bytes = kv_bytes_per_token(model_config, kv_dtype, parallel_state.world_size()) * opts.block_size
    num_blocks = _num_blocks(opts, model_config, device, dtype, max_model_len, block_bytes)
    capacity = num_blocks * opts.block_size
    if capacity < max_model_len and opts.num_kv_blocks is None:
        raise GptServeError(
            f"the KV cache holds {capacity} tokens ({num_blocks * block_bytes / GiB:.2f} GiB) but "
            f"max_model_len is {max_model_len}: raise --kv-cache-memory (or --gpu-memory-utilization) "
            "or lower --max-model-len"
        )
    return EngineConfig(
        model=model_config,
        cache=CacheConfig(
            opts.block_size, num_blocks * block_bytes, num_blocks, opts.enable_prefix_caching, kv_dtype
        ),
        scheduler=SchedulerConfig(
            opts.max_num_seqs,
            max(opts.max_num_batched_tokens, 1),
            max_model_len,
            async_scheduling(opts, device),
        ),
        device=device,
        dtype=dtype,
        seed=opts.seed,
    )


def _num_blocks(
    opts: EngineOptions,
    model_config: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    max_model_len: int,
    block_bytes: int,
) -> int:
    """KV cache blocks: `num_kv_blocks` as given, else the byte budget (asked for, or the device's
    default) in whole blocks."""
    if opts.num_kv_blocks is not None:
        return opts.num_kv_blocks
    budget = parse_bytes(opts.kv_cache_memory)
    if budget is None and device.type == "cuda":
        budget = gpu_kv_budget(
            device,
            model_config,
            dtype,
            opts.max_num_batched_tokens,
            opts.max_num_seqs,
            parallel_state.world_size(),
            opts.gpu_memory_utilization,
            opts.gpu_memory_share,
        )
        # No more than every sequence at its longest needs: a small model keeps a small cache.
        most = opts.max_num_seqs * -(-max_model_len // opts.block_size) * block_bytes
        if budget > most:
            logger.info("KV cache capped at %.2f GiB: max_num_seqs x max_model_len", most / GiB)
            budget = most
    return (DEFAULT_CPU_KV_CACHE_BYTES if budget is None else budget) // block_bytes
