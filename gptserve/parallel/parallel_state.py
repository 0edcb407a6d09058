"""The tensor-parallel process group of this process: rank, world size, and the collectives the layers use.

A world of one never touches `torch.distributed`: every accessor answers from module state and the parallel
layers are built as a dense `Linear` / `nn.Embedding`. A larger world is one process per rank, joined
either from `torchrun`'s environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or by
workers this process spawned on one machine. Tensors move over NCCL on CUDA and gloo on CPU; the step
messages rank 0 broadcasts (plain Python objects) never occupy a GPU stream, so a worker can wait for the
next step for as long as the server stays idle: they go through a shared-memory ring to workers this
process spawned (`step_channel`), and over a gloo group otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

from gptserve.parallel.step_channel import StepChannel

# Workers wait in a broadcast between steps; an idle server must not time them out.
CONTROL_TIMEOUT = timedelta(days=365)
# Collectives inside a step finish in milliseconds; a peer that stops answering mid-step is dead.
DATA_TIMEOUT = timedelta(minutes=10)
# NCCL's teardown waits for peers and for every CUDA graph that captured one of its collectives; past this
# the process leaves the communicator to the driver instead of hanging on its way out.
TEARDOWN_TIMEOUT_S = 15.0

logger = logging.getLogger(__name__)

_rank = 0
_world_size = 1
_local_rank = 0
_control_group: dist.ProcessGroup | None = None
_channel: StepChannel | None = None  # rank 0's messages to the ranks it spawned


def _always() -> bool:
    return True


_peers_alive: Callable[[], bool] = _always


def rank() -> int:
    """This process's tensor-parallel rank (0 serves)."""
    return _rank


def world_size() -> int:
    """Ranks in the tensor-parallel group (1 = no torch.distributed at all)."""
    return _world_size


def local_rank() -> int:
    """Rank on this machine: the CUDA device index a rank uses."""
    return _local_rank


def launched_by_torchrun() -> bool:
    """Whether `torchrun` (or another launcher that sets RANK and WORLD_SIZE) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_process_group(
    rank: int, world_size: int, device_type: str, init_method: str = "env://", local_rank: int | None = None
) -> None:
    """Join the tensor-parallel world. `init_method` defaults to torchrun's environment variables."""
    global _rank, _world_size, _local_rank, _control_group
    _rank, _world_size = rank, world_size
    _local_rank = rank if local_rank is None else local_rank
    if world_size == 1:
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(_local_rank)
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=world_size, timeout=DATA_TIMEOUT
    )
    _control_group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)


def init_from_torchrun(device_type: str) -> None:
    """Join the world `torchrun` describes in the environment."""
    init_process_group(
        int(os.environ["RANK"]),
        int(os.environ["WORLD_SIZE"]),
        device_type,
        local_rank=int(os.environ.get("LOCAL_RANK", os.environ["RANK"])),
    )


def destroy_process_group() -> None:
    """Leave the world (a no-op for a world of one); accessors answer rank 0 of 1 afterwards.

    Drop every CUDA graph that captured a collective first: NCCL's teardown waits until they are gone.
    The teardown runs on a daemon thread and is given up after `TEARDOWN_TIMEOUT_S` (logged), so a peer
    that left without its own teardown cannot hang this process."""
    global _rank, _world_size, _local_rank, _control_group, _channel
    if _channel is not None:
        _channel.close()
        _channel = None
    if _world_size > 1 and dist.is_initialized():
        done = threading.Event()

        def teardown() -> None:
            dist.destroy_process_group()
            done.set()

        threading.Thread(target=teardown, name="gptserve-tp-teardown", daemon=True).start()
        if not done.wait(TEARDOWN_TIMEOUT_S):
            logger.warning(
                "tensor-parallel teardown did not finish in %.0f s; leaving the communicator to the driver",
                TEARDOWN_TIMEOUT_S,
            )
    _rank, _world_size, _local_rank, _control_group = 0, 1, 0, None


@contextlib.contextmanager
def assumed_world(size: int) -> Iterator[None]:
    """Build-time only: layers constructed inside see rank 0 of a world of `size` (no process group), to
    learn one rank's shard shapes, e.g. on the meta device for GEMM tuning."""
    global _world_size
    if dist.is_available() and dist.is_initialized():
        raise RuntimeError("a tensor-parallel group is running in this process")
    previous = _world_size
    _world_size = size
    try:
        yield
    finally:
        _world_size = previous


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the ranks, in place; returns `x`."""
    if _world_size > 1:
        dist.all_reduce(x)
    return x


def broadcast_tensor(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's `x` into every rank's `x` (same shape and dtype), in place; returns `x`."""
    if _world_size > 1:
        dist.broadcast(x, src=0)
    return x


def all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Every rank's `x` concatenated along `dim`, in rank order, on every rank."""
    if _world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=dim)


def use_step_channel(channel: StepChannel, peers_alive: Callable[[], bool] = _always) -> None:
    """Send (rank 0) or receive (a spawned rank) the broadcast objects through `channel` from now on;
    `peers_alive` tells whether the processes on the other side still run."""
    global _channel, _peers_alive
    _channel, _peers_alive = channel, peers_alive


def broadcast_object(obj: object = None) -> object:
    """Rank 0's `obj`, on every rank (pickled; through the step channel if there is one)."""
    if _world_size == 1:
        return obj
    if _channel is None:
        return _gloo_broadcast(obj)
    if _rank == 0:
        _channel.send(obj, _gloo_broadcast, _peers_alive)
        return obj
    return _channel.receive(_gloo_broadcast, _peers_alive)


def _gloo_broadcast(obj: object = None) -> object:
    box = [obj if _rank == 0 else None]
    dist.broadcast_object_list(box, src=0, group=_control_group)
    return box[0]
