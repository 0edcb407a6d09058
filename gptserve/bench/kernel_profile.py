"""Where a benchmark's device time goes: the operations of a profiled window grouped into matmuls,
attention, communication between tensor-parallel ranks and the rest, per engine step.

On CUDA the profiler records the GPU kernels (those replayed from CUDA graphs included) and each kernel's
own time counts once. On a CPU the operators' self CPU time stands in for it. Only this process is
profiled: under tensor parallelism, rank 0, whose collectives take as long as the slowest rank's.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

# (kind, lower-case name fragments), first match wins: communication kernels also name a reduction.
KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("communication", ("nccl", "allreduce", "all_reduce", "allgather", "all_gather", "broadcast", "gloo")),
    ("attention", ("attention", "attn", "flash", "fmha", "paged_decode", "combine_splits", "write_kv")),
    (
        "matmul",
        ("gemm", "gemv", "matmul", "cutlass", "nvjet", "xmma", "aten::mm", "aten::addmm", "aten::bmm"),
    ),
)
OTHER = "other"


def kind_of(name: str) -> str:
    """The kind of one kernel or operator, by its name."""
    lowered = name.lower()
    for kind, fragments in KINDS:
        if any(fragment in lowered for fragment in fragments):
            return kind
    return OTHER


@dataclass
class KernelTimes:
    """Device (or CPU) microseconds by kind over the profiled window, and how many steps it held."""

    device: str
    micros: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    by_name: dict[str, tuple[float, int]] = field(default_factory=dict)  # kernel -> (micros, calls)
    steps: int = 0
    wall_s: float = 0.0  # the window's wall time, under the profiler

    @property
    def total_ms(self) -> float:
        return sum(self.micros.values()) / 1e3

    def per_step_ms(self, kind: str) -> float:
        return self.micros.get(kind, 0.0) / 1e3 / max(self.steps, 1)

    def rows(self) -> list[tuple[str, str]]:
        """Table rows: time per step by kind, with its share of the total."""
        unit = "GPU kernels" if self.device == "cuda" else "CPU operators"
        steps = max(self.steps, 1)
        wall_ms = self.wall_s * 1e3 / steps
        busy = self.total_ms / steps / wall_ms if wall_ms else 0.0
        idle = "the GPU waits for the host" if self.device == "cuda" else "Python and engine work"
        rows = [
            (
                f"profile ({unit})",
                f"{self.steps} steps: {self.total_ms / steps:.3f} ms a step busy, {wall_ms:.3f} ms wall "
                f"({busy:.0%} busy; {idle} the rest)",
            )
        ]
        total = sum(self.micros.values()) or 1.0
        for kind in [k for k, _ in KINDS] + [OTHER]:
            if kind in self.micros:
                rows.append(
                    (
                        f"  {kind}",
                        f"{self.per_step_ms(kind):.3f} ms a step ({self.micros[kind] / total:.0%}), "
                        f"{self.calls[kind] / max(self.steps, 1):.1f} calls a step",
                    )
                )
        rows += self._largest(OTHER, 4)
        return rows

    def _largest(self, kind: str, count: int) -> list[tuple[str, str]]:
        """Rows for the `count` kernels of `kind` that take the most time: what the kind is made of."""
        steps = max(self.steps, 1)
        named = [
            (micros, calls, name) for name, (micros, calls) in self.by_name.items() if kind_of(name) == kind
        ]
        return [
            (f"    {name[:48]}", f"{micros / 1e3 / steps:.3f} ms a step, {calls / steps:.1f} calls a step")
            for micros, calls, name in sorted(named, reverse=True)[:count]
        ]

    def as_dict(self) -> dict[str, object]:
        return {
            "device": self.device,
            "steps": self.steps,
            "wall_ms_per_step": self.wall_s * 1e3 / max(self.steps, 1),
            "ms_per_step": {kind: self.per_step_ms(kind) for kind in self.micros},
            "calls": dict(self.calls),
        }


@contextlib.contextmanager
def profiled(device: torch.device) -> Iterator[KernelTimes]:
    """Profile the block; the yielded `KernelTimes` is filled when it ends (set its `steps` inside)."""
    cuda = device.type == "cuda"
    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    times = KernelTimes("cuda" if cuda else "cpu")
    with torch.profiler.profile(activities=[activity]) as prof:
        start = time.perf_counter()
        yield times
        if cuda:
            torch.cuda.synchronize(device)
        times.wall_s = time.perf_counter() - start
    wanted = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    for event in prof.key_averages():
        if event.device_type != wanted:
            continue
        micros = event.self_device_time_total if cuda else event.self_cpu_time_total
        if micros <= 0:
            continue
        kind = kind_of(event.key)
        times.micros[kind] = times.micros.get(kind, 0.0) + micros
        times.calls[kind] = times.calls.get(kind, 0) + event.count
        micros_before, calls_before = times.by_name.get(event.key, (0.0, 0))
        times.by_name[event.key] = (micros_before + micros, calls_before + event.count)


def profile_engine_steps(engine: Any, work: Callable[[], object]) -> KernelTimes:
    """Profile `work` (something that drives `engine`, an `LLMEngine`), counting the engine steps it ran."""
    with profiled(engine.config.device) as times:
        before = engine.core.num_steps
        work()
        times.steps = engine.core.num_steps - before
    return times
