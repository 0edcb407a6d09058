"""Starts and stops this process's tensor-parallel world of engine processes.

Two ways in. Launched by `torchrun` (RANK and WORLD_SIZE set), the world is torchrun's: every process
runs the same command, rank 0 serves and the others leave it for the worker's loop
(`serve_torchrun_rank`). Otherwise rank 0 is this process and it spawns the other N-1 ranks on this
machine (`torch.multiprocessing`, spawn start method, entering at `tp_worker.worker_main`), which join
over a TCP rendezvous on the loopback interface and take their step messages from a shared-memory
channel (`step_channel`).

A spawned worker that dies fails the whole group loudly: gloo collectives raise when a peer's socket
closes, and a watchdog thread on rank 0 reports the worker's exit code and ends the process, which is
what unblocks rank 0 when it waits in a rendezvous or an NCCL collective that would otherwise hang.
Shutdown (explicit, or at interpreter exit) broadcasts the stop message, joins the workers and kills
any that do not leave in time.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import NoReturn

import torch
import torch.multiprocessing as mp

from gptserve.engine.engine_options import EngineOptions, resolve_device
from gptserve.engine.tp_worker import end_process_on_cuda, serve_rank, worker_main
from gptserve.errors import GptServeError
from gptserve.loading.checkpoint import Checkpoint
from gptserve.parallel import parallel_state
from gptserve.parallel.step_channel import StepChannel

logger = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 30.0


@dataclass
class TensorParallelWorld:
    """The running world as rank 0 (or a torchrun rank other than 0) sees it."""

    world_size: int
    rank: int
    workers: list[BaseProcess] = field(default_factory=list)  # spawned ranks 1..N-1 (rank 0 only)
    stopping: threading.Event = field(default_factory=threading.Event)
    # run before leaving the process group: release what holds its communicators (captured CUDA graphs)
    before_leave: list[Callable[[], None]] = field(default_factory=list)

    def shutdown(self) -> None:
        """Stop the workers (rank 0 broadcasts the stop message), release what `before_leave` names, and
        leave the process group."""
        global _world
        if self.stopping.is_set():
            return
        self.stopping.set()
        if self.rank == 0:
            try:
                parallel_state.broadcast_object(None)
            except Exception as e:  # a worker already gone: nothing left to tell
                logger.warning("tensor-parallel shutdown: could not reach every worker (%s)", e)
        for proc in self.workers:
            proc.join(JOIN_TIMEOUT_S)
            if proc.is_alive():
                logger.error("tensor-parallel worker %s did not exit; killing it", proc.name)
                proc.kill()
                proc.join(5)
        for release in self.before_leave:
            release()
        parallel_state.destroy_process_group()
        _world = None

    def _watch(self) -> None:
        """Rank 0: end this process loudly when a worker exits before shutdown."""
        sentinels = {proc.sentinel: proc for proc in self.workers}
        from multiprocessing.connection import wait

        ready = wait(list(sentinels))
        if self.stopping.wait(timeout=2.0):  # exits during a shutdown are expected
            return
        proc = sentinels[ready[0]]
        logger.critical(
            "tensor-parallel worker %s (pid %s) exited with code %s; the tensor-parallel group cannot "
            "continue, exiting",
            proc.name,
            proc.pid,
            proc.exitcode,
        )
        os._exit(1)


_world: TensorParallelWorld | None = None


def current_world() -> TensorParallelWorld | None:
    """The world this process is part of, or None when it runs alone."""
    return _world


def start_world(
    world_size: int, device: torch.device, model: str | None, options: EngineOptions
) -> TensorParallelWorld:
    """Join (torchrun) or create (spawn) a world of `world_size` ranks; `model` and `options` are what a
    spawned worker needs to load its shard (`tp_worker.worker_main`)."""
    global _world
    if _world is not None:
        raise GptServeError(
            f"a tensor-parallel group of {_world.world_size} ranks is already running in this process; "
            "shut it down before building another engine"
        )
    if parallel_state.launched_by_torchrun():
        env_world = int(os.environ["WORLD_SIZE"])
        if world_size not in (1, env_world):
            raise GptServeError(
                f"--tensor-parallel-size {world_size} disagrees with torchrun's WORLD_SIZE {env_world}"
            )
        parallel_state.init_from_torchrun(device.type)
        _world = TensorParallelWorld(env_world, parallel_state.rank())
    else:
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        channel = _step_channel(world_size)
        ctx = mp.get_context("spawn")
        workers = []
        for rank in range(1, world_size):
            proc = ctx.Process(
                target=worker_main,
                args=(rank, world_size, init_method, model, options, channel and channel.name),
                name=f"gptserve-tp-rank{rank}",
                daemon=True,
            )
            proc.start()
            workers.append(proc)
        _world = TensorParallelWorld(world_size, 0, workers)
        threading.Thread(target=_world._watch, name="gptserve-tp-watchdog", daemon=True).start()
        parallel_state.init_process_group(0, world_size, device.type, init_method)
        if channel is not None:
            parallel_state.use_step_channel(channel, lambda: all(p.is_alive() for p in workers))
    atexit.register(shutdown_world)
    return _world


def shutdown_world() -> None:
    """Stop this process's tensor-parallel world, if there is one."""
    if _world is not None:
        _world.shutdown()


def serve_torchrun_rank(
    world: TensorParallelWorld, model: str | Path | None, options: EngineOptions, checkpoint: Checkpoint
) -> NoReturn:
    """A torchrun rank other than 0, which runs the same program as rank 0: serve rank 0's steps on this
    rank's shard of `checkpoint`, then end the process once rank 0 stops the group."""
    try:
        serve_rank(model, options, checkpoint)
    except BaseException:
        world.shutdown()
        raise
    end_process_on_cuda(resolve_device(options.device))
    world.shutdown()
    raise SystemExit(0)


def _step_channel(world_size: int) -> StepChannel | None:
    """The shared-memory channel to the workers about to be spawned; None (gloo carries the steps) where
    this machine cannot make one."""
    try:
        return StepChannel.create(world_size - 1)
    except OSError as e:
        logger.warning("no shared memory for the tensor-parallel step channel (%s); steps go over gloo", e)
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
