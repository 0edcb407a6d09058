"""A tensor-parallel rank other than 0: load this rank's shard of the model, take rank 0's runner layout,
build the model runner and capture the same CUDA graphs, then run every step rank 0 broadcasts until it
broadcasts the stop message.

Each step arrives as a `StepInputs` (packed ids, positions, cache slots, block tables, block copies), the
same object rank 0's `ModelRunner` runs, so the ranks execute the same forward pass and meet in the same
collectives; each rank's KV cache holds its own KV heads. Sampling happens on rank 0 only.

`worker_main` is the entry of a rank that `tp_launcher` spawned; a `torchrun` rank other than 0 reaches
`serve_rank` through `tp_launcher.serve_torchrun_rank`.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from gptserve.config import ModelConfig
from gptserve.engine.engine_options import EngineOptions, rank_device, resolve_device, resolve_dtype
from gptserve.engine.model_loader import load_model
from gptserve.engine.model_runner import ModelRunner
from gptserve.loading.checkpoint import Checkpoint
from gptserve.loading.loader import load_checkpoint
from gptserve.parallel import parallel_state
from gptserve.parallel.sharding import check_tensor_parallel
from gptserve.parallel.step_channel import PeerGone, StepChannel

logger = logging.getLogger(__name__)


@dataclass
class RunnerLayout:
    """What rank 0 decided that every rank's model runner must match; rank 0 broadcasts it once its KV
    cache is sized."""

    num_blocks: int
    block_size: int
    max_model_len: int
    graph_max_num_seqs: int | None  # CUDA graphs captured up to this batch; None: eager
    kv_dtype: torch.dtype | None = None


def serve_steps(runner: ModelRunner) -> None:
    """Run rank 0's steps on this rank's shard until rank 0 broadcasts None."""
    while True:
        step = parallel_state.broadcast_object()
        if step is None:
            return
        runner.run(step)


def serve_rank(model: str | Path | None, opts: EngineOptions, checkpoint: Checkpoint | None = None) -> None:
    """This rank's whole life in the group it has joined: load its shard of `model` (or of `checkpoint`),
    take rank 0's layout, capture the same graphs (their collectives meet rank 0's), serve steps. Returns
    after rank 0's stop message, or quietly when rank 0 gave up before sending the layout."""
    device = rank_device(resolve_device(opts.device))
    dtype = resolve_dtype(opts.dtype, device)
    checkpoint = checkpoint or load_checkpoint(model)
    model_config = ModelConfig.from_hf(checkpoint.hf_config)
    check_tensor_parallel(model_config, parallel_state.world_size())
    net = load_model(model, checkpoint, model_config, device, dtype, opts)
    layout: RunnerLayout | None = parallel_state.broadcast_object()
    if layout is None:
        return
    runner = ModelRunner(
        net, model_config, layout.num_blocks, layout.block_size, device, dtype, layout.kv_dtype
    )
    if layout.graph_max_num_seqs is not None:
        runner.capture_graphs(layout.graph_max_num_seqs, layout.max_model_len)
    serve_steps(runner)


def end_process_on_cuda(device: torch.device) -> None:
    """A rank other than 0 after rank 0's stop message. On CUDA the process ends here at once: NCCL's
    teardown can wait for peers that are leaving too, and the driver reclaims everything anyway."""
    if device.type == "cuda":
        logging.shutdown()
        os._exit(0)


def worker_main(
    rank: int,
    world_size: int,
    init_method: str,
    model: str | None,
    options: EngineOptions,
    channel_name: str | None = None,
) -> None:
    """Entry point of a spawned rank: join the world, serve rank 0's steps on this rank's shard, leave.

    Exits with status 1 (after logging the traceback) on any failure, which rank 0's watchdog reports,
    and when rank 0's process is gone (`PeerGone` from the step channel).
    """
    logging.basicConfig(
        level=logging.WARNING, format=f"%(asctime)s %(levelname)s rank {rank} %(name)s: %(message)s"
    )
    # Rank 0 decides when this rank stops (it drains requests on Ctrl-C or SIGTERM first); a signal sent
    # to the whole process group must not take the worker away under it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        device = resolve_device(options.device)
        parallel_state.init_process_group(rank, world_size, device.type, init_method)
        if channel_name is not None:
            parent = multiprocessing.parent_process()
            channel = StepChannel.attach(channel_name, world_size - 1, rank - 1)
            parallel_state.use_step_channel(channel, parent.is_alive if parent else lambda: True)
        serve_rank(model, options)
    except PeerGone:
        logger.error("tensor-parallel worker rank %d: rank 0 has exited; leaving", rank)
        code = 1
    except BaseException:
        logger.exception("tensor-parallel worker rank %d failed", rank)
        code = 1
    else:
        end_process_on_cuda(device)
        code = 0
    parallel_state.destroy_process_group()
    sys.exit(code)
