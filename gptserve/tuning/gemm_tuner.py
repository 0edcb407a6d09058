"""Tune a model's GEMMs on this GPU with PyTorch TunableOp and the Triton kernels, and write the tuning files.

FasterTransformer's `gpt_gemm` timed every cuBLAS algorithm for each GEMM shape of GPT-J and wrote the
winners to `gemm_config.in`. Here two searches run for each (rows, n, k) shape the model runs: PyTorch's
TunableOp times cuBLAS's default and the cuBLASLt algorithms and picks the fastest, and every launch
configuration of the Triton matrix product (`gptserve.kernels.matmul`: the one-row GEMV's tiles,
split-K tiles for decode-sized row counts, large tiles for prompts) is timed too. Each candidate is timed
against cuBLAS's default, both captured in CUDA graphs and replayed in turn (GPU time only, as a decode
step's graph sees it, the calls cycling through copies of the weight larger than the L2 cache together,
so that each call reads its weight from memory as a model's GEMMs do); the fastest serves if it wins by
`min_gain` (TunableOp's own timing is short and a pick can lose on a second look), else cuBLAS's
default. Serving loads the files (`gptserve.layers.tuning_file`) and dispatches each GEMM to what won
for it, in eager steps and inside CUDA graphs alike. The tuning files sit beside the model:

- `gptserve-gemm-tuning.csv`: the TunableOp picks that serve, in TunableOp's format (read by
  `torch.cuda.tunable`); not written when none serves;
- `gptserve-gemm-tuning.json`: what was tuned, on which GPU and software, each GEMM's time with cuBLAS's
  default, with TunableOp's pick and with the best Triton configuration (which it names), what serves
  it, and the step-time estimate those give.
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gptserve.layers.tuning_file import REPORT_FILE, RESULTS_FILE
from gptserve.progress import progress_bar
from gptserve.tuning.gemm_shapes import GemmShape

logger = logging.getLogger(__name__)

TIMED_REPEATS = 15
MIN_GAIN = 0.02  # a pick must be this much faster than cuBLAS's default to be kept


SERVED_BY = ("cublas", "tunableop", "triton")


@dataclass
class TunedGemm:
    name: str
    rows: int
    n: int
    k: int
    bias: bool
    layers: int
    default_ms: float
    tuned_ms: float  # TunableOp's pick
    kept: bool = True  # TunableOp's pick serves (it won, by the minimum gain)
    triton_ms: float | None = None  # the best Triton configuration
    triton_config: dict[str, int] | None = None
    served: str = "tunableop"  # one of SERVED_BY

    @property
    def served_ms(self) -> float:
        """What the GEMM costs when serving with the tuning files."""
        if self.served == "triton" and self.triton_ms is not None:
            return self.triton_ms
        return self.tuned_ms if self.served == "tunableop" else self.default_ms


def _captured(fn: Any, calls: int) -> torch.cuda.CUDAGraph:
    """`calls` back-to-back calls fn(0), fn(1), ... in one CUDA graph, after a warm-up call outside it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(0)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    return graph


def _weight_copies(w: torch.Tensor) -> list[torch.Tensor]:
    """`w` and enough copies of it that calls cycling through them read twice the L2 cache's size: each
    call then reads its weight from memory, as a model's GEMMs do, instead of from the cache the previous
    call filled (a 4096 x 4096 fp16 weight fits in an H100's L2)."""
    l2 = getattr(torch.cuda.get_device_properties(w.device), "L2_cache_size", 64 << 20)
    copies = min(8, max(1, -(-2 * l2 // (w.numel() * w.element_size()))))
    return [w] + [w.clone() for _ in range(copies - 1)]


def _calls_per_replay(m: int) -> int:
    """Enough calls in one replay that a replay takes tens of microseconds or more."""
    return 20 if m <= 256 else 5 if m <= 2048 else 2


def _time_in_turn(
    graphs: list[torch.cuda.CUDAGraph], calls: int, repeats: int = TIMED_REPEATS
) -> list[float]:
    """Median milliseconds of one call for each graph, replayed in turn so both see the same clocks."""
    times: list[list[float]] = [[] for _ in graphs]
    for graph in graphs:
        graph.replay()
    for _ in range(repeats):
        for i, graph in enumerate(graphs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times[i].append(start.elapsed_time(end) / calls)
    return [statistics.median(t) for t in times]


def tune_gemms(
    shapes: list[GemmShape],
    rows: list[int],
    dtype: torch.dtype,
    out_dir: Path,
    device: torch.device,
    max_tuning_ms: int = 30,
    min_gain: float = MIN_GAIN,
    triton: bool = True,
) -> list[TunedGemm]:
    """Tune every (shape, row count) and write the files into `out_dir`; returns the timings. The faster
    of TunableOp's pick and the best Triton configuration (with `triton`) serves where it is at least
    `min_gain` faster than cuBLAS's default (a negative gain always takes the faster of the two)."""
    from torch.cuda import tunable

    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / RESULTS_FILE
    results_path.unlink(missing_ok=True)
    # TunableOp writes everything it tuned to its own file (as it goes, or at exit, by torch version);
    # that goes to a fresh scratch directory, and the tuning file gets the kept picks only, below.
    scratch = Path(tempfile.mkdtemp(prefix="gptserve-tuning-"))
    tunable.set_filename(str(scratch / "tunableop-results.csv"))
    problems = [(shape, m) for shape in shapes for m in rows]
    tuned: list[TunedGemm] = []
    dropped: set[tuple[str, str]] = set()  # TunableOp's (operator, parameters) of picks not kept
    tunable.enable(False)
    with torch.inference_mode(), progress_bar(len(problems), "tuning GEMMs", "gemm") as bar:
        for shape, m in problems:
            x = torch.randn(m, shape.k, device=device, dtype=dtype)
            ws = _weight_copies(torch.randn(shape.n, shape.k, device=device, dtype=dtype) * 0.02)
            b = torch.randn(shape.n, device=device, dtype=dtype) if shape.bias else None

            def gemm(i: int, x=x, ws=ws, b=b) -> torch.Tensor:
                return F.linear(x, ws[i % len(ws)], b)

            calls = _calls_per_replay(m)
            default_graph = _captured(gemm, calls)
            before = {tuple(r[:2]) for r in tunable.get_results()}
            tunable.enable(True)
            tunable.tuning_enable(True)
            tunable.set_max_tuning_duration(max_tuning_ms)
            gemm(0)  # TunableOp searches this shape now
            tunable.tuning_enable(False)
            tuned_graph = _captured(gemm, calls)
            tunable.enable(False)
            default_ms, tuned_ms = _time_in_turn([default_graph, tuned_graph], calls)
            del tuned_graph
            result = TunedGemm(
                shape.name, m, shape.n, shape.k, shape.bias, shape.layers, default_ms, tuned_ms
            )
            if triton and dtype in (torch.float16, torch.bfloat16):  # (float32 dots would round to TF32)
                _time_triton_candidates(result, default_graph, calls, x, ws, b)
            _choose(result, min_gain)
            if not result.kept:
                dropped |= {tuple(r[:2]) for r in tunable.get_results()} - before
            tuned.append(result)
            del default_graph
            bar.update(1)
    if any(t.kept for t in tuned):
        _write_results(results_path, dropped)
    else:
        results_path.unlink(missing_ok=True)
    report = {
        "format": 3,
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dtype": str(dtype).removeprefix("torch."),
        "min_gain": min_gain,
        "kept": sum(t.kept for t in tuned),
        "served": served_counts(tuned),
        "gemms": [asdict(t) for t in tuned],
        "step_estimate_ms": step_estimates(tuned),
    }
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2))
    return tuned


def _time_triton_candidates(
    result: TunedGemm,
    default_graph: torch.cuda.CUDAGraph,
    calls: int,
    x: torch.Tensor,
    ws: list[torch.Tensor],
    b: torch.Tensor | None,
) -> None:
    """Time every Triton configuration for this GEMM against cuBLAS's default (each replayed in turn with
    the default's graph) and record the fastest in `result`, in the default's milliseconds of the first
    timing. A configuration this GPU cannot run (too much shared memory) is skipped."""
    from gptserve.kernels.matmul import matmul
    from gptserve.kernels.matmul_configs import candidate_configs

    best: tuple[float, dict[str, int]] | None = None
    for config in candidate_configs(result.rows):
        try:
            graph = _captured(lambda i, config=config: matmul(x, ws[i % len(ws)], b, config), calls)
        except Exception as exc:  # noqa: BLE001 - Triton's compile and resource errors vary by version
            logger.debug("Triton configuration %s skipped for %s: %s", config, result.name, exc)
            continue
        default_ms, triton_ms = _time_in_turn([default_graph, graph], calls)
        ratio = triton_ms / default_ms
        if best is None or ratio < best[0]:
            best = (ratio, config.as_dict())
        del graph
    if best is not None:
        result.triton_ms = best[0] * result.default_ms
        result.triton_config = best[1]


def _choose(result: TunedGemm, min_gain: float) -> None:
    """What serves the GEMM: the faster of TunableOp's pick and the best Triton configuration if it beats
    cuBLAS's default by `min_gain`, else the default."""
    candidates = [("tunableop", result.tuned_ms)]
    if result.triton_ms is not None:
        candidates.append(("triton", result.triton_ms))
    by, ms = min(candidates, key=lambda c: c[1])
    result.served = by if ms <= result.default_ms * (1 - min_gain) else "cublas"
    result.kept = result.served == "tunableop"


def _write_results(path: Path, dropped: set[tuple[str, str]]) -> None:
    """TunableOp's results in its CSV format: the validator lines (software versions the results hold
    for), then one line per kept operation: operator, parameters, solution, milliseconds."""
    from torch.cuda import tunable

    lines = [f"Validator,{name},{value}" for name, value in tunable.get_validators()]
    lines += [
        ",".join(str(field) for field in result)
        for result in tunable.get_results()
        if tuple(result[:2]) not in dropped
    ]
    path.write_text("\n".join(lines) + "\n")


def served_counts(tuned: list[TunedGemm]) -> dict[str, int]:
    """How many GEMMs each of cuBLAS's default, TunableOp's picks and Triton configurations serves."""
    return {by: sum(t.served == by for t in tuned) for by in SERVED_BY}


def step_estimates(tuned: list[TunedGemm]) -> dict[str, dict[str, float]]:
    """Per row count, the GEMM time of one forward pass (each shape times its number of layers) with
    cuBLAS's defaults and as served with the tuning file: {rows: {"default_ms": .., "tuned_ms": ..}}."""
    out: dict[str, dict[str, float]] = {}
    for t in tuned:
        entry = out.setdefault(str(t.rows), {"default_ms": 0.0, "tuned_ms": 0.0})
        entry["default_ms"] += t.default_ms * t.layers
        entry["tuned_ms"] += t.served_ms * t.layers
    return out
