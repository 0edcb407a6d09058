"""A tensor-parallel rank other than 0: build this rank's shard of the model, then run every step rank 0
broadcasts until it broadcasts the stop message.

Each step arrives as a `StepInputs` (packed ids, positions, cache slots, block tables, block copies), the
same object rank 0's `ModelRunner` runs, so the ranks execute the same forward pass and meet in the same
collectives; each rank's KV cache holds its own KV heads. Sampling happens on rank 0 only.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import sys

from gptserve.engine.model_runner import ModelRunner
from gptserve.parallel import parallel_state
from gptserve.parallel.step_channel import PeerGone, StepChannel

logger = logging.getLogger(__name__)


def serve_steps(runner: ModelRunner) -> None:
    """Run rank 0's steps on this rank's shard until rank 0 broadcasts None."""
    while True:
        step = parallel_state.broadcast_object()
        if step is None:
            return
        runner.run(step)


def worker_main(
    rank: int,
    world_size: int,
    init_method: str,
    model: str | None,
    options: object,
    channel_name: str | None = None,
) -> None:
    """Entry point of a spawned rank: join the world, load this rank's shard, serve steps, leave.

    Exits with status 1 (after logging the traceback) on any failure, which rank 0's watchdog reports,
    and when rank 0's process is gone (`PeerGone` from the step channel).
    """
    from gptserve.engine.builder import build_engine, resolve_device

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
        build_engine(model, options)  # a rank other than 0 runs `serve_steps` inside and exits
    except SystemExit as e:
        code = e.code or 0
    except PeerGone:
        logger.error("tensor-parallel worker rank %d: rank 0 has exited; leaving", rank)
        code = 1
    except BaseException:
        logger.exception("tensor-parallel worker rank %d failed", rank)
        code = 1
    else:
        code = 0
    parallel_state.destroy_process_group()
    sys.exit(code)
