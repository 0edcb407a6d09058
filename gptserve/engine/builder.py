"""Builds a ready `LLMEngine` from a model path and engine options (the serve flags, snake case).

This is rank 0's side of the engine: under tensor parallelism the other ranks run `tp_worker` (spawned by
`tp_launcher`, or handed to it straight away when `torchrun` started them) and follow the layout and the
steps rank 0 sends them.
"""

from __future__ import annotations

import logging
from pathlib import Path

from gptserve.config import EngineConfig, ModelConfig
from gptserve.engine.engine_config import engine_config
from gptserve.engine.engine_options import (
    EngineOptions,
    gemv_kernel,
    rank_device,
    resolve_device,
    resolve_dtype,
)
from gptserve.engine.llm_engine import LLMEngine
from gptserve.engine.model_loader import load_model
from gptserve.engine.model_runner import ModelRunner
from gptserve.engine.tp_launcher import current_world, serve_torchrun_rank, start_world
from gptserve.engine.tp_worker import RunnerLayout
from gptserve.errors import GptServeError
from gptserve.generation_defaults import GenerationDefaults
from gptserve.loading.checkpoint import Checkpoint
from gptserve.loading.generation_config import read_generation_defaults
from gptserve.loading.loader import load_checkpoint
from gptserve.parallel import parallel_state
from gptserve.parallel.sharding import check_tensor_parallel

logger = logging.getLogger(__name__)


def build_engine(
    model: str | Path | None = None,
    options: EngineOptions | None = None,
    checkpoint: Checkpoint | None = None,
) -> LLMEngine:
    """Load the checkpoint at `model` (None = the embedded default) and size the KV cache.

    A `checkpoint` given directly (random weights for benchmarks) is used instead of reading `model`,
    which then only names it.

    With `tensor_parallel_size` N > 1 (or under `torchrun`) this process becomes rank 0 of N and returns
    the engine that drives them all; a torchrun rank other than 0 serves rank 0's steps instead
    (`tp_launcher.serve_torchrun_rank`) and exits when rank 0 shuts the group down.
    """
    opts = options or EngineOptions()
    gemv_kernel(opts.gemv)  # a bad value is refused before anything is read
    # A checkpoint handed over without a model path (random weights) recommends nothing.
    given_alone = checkpoint is not None and model is None
    sampling_defaults = (
        GenerationDefaults() if given_alone else read_generation_defaults(model, opts.generation_config)
    )
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    checkpoint = checkpoint or load_checkpoint(model)
    model_config = ModelConfig.from_hf(checkpoint.hf_config)
    world = None
    if opts.tensor_parallel_size != 1 or parallel_state.launched_by_torchrun():
        check_tensor_parallel(model_config, opts.tensor_parallel_size)
        world = start_world(opts.tensor_parallel_size, device, None if model is None else str(model), opts)
        check_tensor_parallel(model_config, world.world_size)
        if world.rank != 0:
            serve_torchrun_rank(world, model, opts, checkpoint)
        device = rank_device(device)
    elif current_world() is not None:
        raise GptServeError("a tensor-parallel group is running in this process; shut it down first")
    try:
        net = load_model(model, checkpoint, model_config, device, dtype, opts)
        config = engine_config(opts, model_config, device, dtype)
        _log_engine(model, checkpoint, config)
        tokenizer = checkpoint.tokenizer
        if (
            tokenizer is not None
            and checkpoint.chat_template
            and not getattr(tokenizer, "chat_template", None)
        ):
            tokenizer.chat_template = checkpoint.chat_template
        cache = config.cache
        runner = ModelRunner(
            net, model_config, cache.num_blocks, cache.block_size, device, dtype, cache.dtype
        )
        model_name = str(model) if model else "SmolLM2-135M-Instruct"
        engine = LLMEngine(config, runner, tokenizer, model_name, checkpoint.chat_template)
        engine.sampling_defaults = sampling_defaults
        logger.info("default sampling values: %s", sampling_defaults.describe())
        # Under tensor parallelism the graphs capture the all-reduces too; they are released before the
        # world's teardown, which waits for them.
        graphs = device.type == "cuda" and not opts.enforce_eager
        graph_max_num_seqs = opts.max_num_seqs if graphs else None
        if world is not None:  # the workers size their caches and capture their graphs alongside
            world.before_leave.append(runner.release)
            parallel_state.broadcast_object(
                RunnerLayout(
                    cache.num_blocks,
                    cache.block_size,
                    config.scheduler.max_model_len,
                    graph_max_num_seqs,
                    cache.dtype,
                )
            )
        if graph_max_num_seqs is not None:
            runner.capture_graphs(graph_max_num_seqs, config.scheduler.max_model_len)
    except BaseException:
        if world is not None:
            world.shutdown()
        raise
    if world is not None:
        runner.publish = parallel_state.broadcast_object
        logger.info("tensor parallel: %d ranks, this process is rank 0", world.world_size)
    return engine


def _log_engine(model: str | Path | None, checkpoint: Checkpoint, config: EngineConfig) -> None:
    """The start-up line that says what runs where: model, dtype, device, KV cache size and length."""
    cache = config.cache
    logger.info(
        "model %s (%s, %s): dtype %s, device %s, KV cache %d tokens in %d blocks (%.1f MiB, %s), "
        "max_model_len %d",
        model or "embedded default",
        config.model.architecture,
        checkpoint.source,
        str(config.dtype).removeprefix("torch."),
        config.device,
        cache.num_blocks * cache.block_size,
        cache.num_blocks,
        cache.kv_cache_memory / (1 << 20),
        str(cache.dtype).removeprefix("torch."),
        config.scheduler.max_model_len,
    )
