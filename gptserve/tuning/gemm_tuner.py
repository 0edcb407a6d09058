"""Tune a model's GEMMs on this GPU with PyTorch TunableOp, and load the result when serving.

FasterTransformer's `gpt_gemm` timed every cuBLAS algorithm for each GEMM shape of GPT-J and wrote the
winners to `gemm_config.in`. Here PyTorch's TunableOp does the search: for each (rows, n, k) shape the
model runs it times cuBLAS's default and the cuBLASLt algorithms and picks the fastest. Each pick is then
timed against cuBLAS's default once more, both captured in CUDA graphs and replayed in turn (GPU time
only, as a decode step's graph sees it), and kept only where it wins by `min_gain`: TunableOp's own
timing is short and a pick can lose on a second look. Serving with the file loaded (tuning itself off)
dispatches each kept GEMM to its pick, in eager steps and inside CUDA graphs alike, and every other GEMM to
cuBLAS's default. The tuning files sit beside the model:

- `gptserve-gemm-tuning.csv`: the kept picks in TunableOp's format (read by `torch.cuda.tunable`); not
  written when cuBLAS's default won everywhere;
- `gptserve-gemm-tuning.json`: what was tuned, on which GPU and software, each GEMM's time with cuBLAS's
  default and with the pick, whether it was kept, and the step-time estimate those give.

A file tuned on another GPU model or PyTorch version is not loaded (serve logs why).
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

from gptserve.progress import progress_bar
from gptserve.tuning.gemm_shapes import GemmShape

logger = logging.getLogger(__name__)

RESULTS_FILE = "gptserve-gemm-tuning.csv"
REPORT_FILE = "gptserve-gemm-tuning.json"
TIMED_REPEATS = 15
MIN_GAIN = 0.02  # a pick must be this much faster than cuBLAS's default to be kept


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
    kept: bool = True  # the pick beat the default by the minimum gain; otherwise the default serves

    @property
    def served_ms(self) -> float:
        """What the GEMM costs when serving with the tuning file: the pick if kept, else the default."""
        return self.tuned_ms if self.kept else self.default_ms


def tuning_dir(model: str | Path) -> Path:
    """Where a model's tuning file goes: its directory, or the directory of a single-file checkpoint."""
    path = Path(model)
    return path if path.is_dir() else path.parent


def _captured(fn: Any, calls: int) -> torch.cuda.CUDAGraph:
    """`calls` back-to-back calls of `fn` in one CUDA graph, after a warm-up call outside it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph


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
) -> list[TunedGemm]:
    """Tune every (shape, row count) and write the files into `out_dir`; returns the timings. A pick is
    kept where it is at least `min_gain` faster than cuBLAS's default (a negative gain keeps every pick)."""
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
            w = torch.randn(shape.n, shape.k, device=device, dtype=dtype) * 0.02
            b = torch.randn(shape.n, device=device, dtype=dtype) if shape.bias else None

            def gemm(x=x, w=w, b=b) -> torch.Tensor:
                return F.linear(x, w, b)

            calls = _calls_per_replay(m)
            default_graph = _captured(gemm, calls)
            before = {tuple(r[:2]) for r in tunable.get_results()}
            tunable.enable(True)
            tunable.tuning_enable(True)
            tunable.set_max_tuning_duration(max_tuning_ms)
            gemm()  # TunableOp searches this shape now
            tunable.tuning_enable(False)
            tuned_graph = _captured(gemm, calls)
            tunable.enable(False)
            default_ms, tuned_ms = _time_in_turn([default_graph, tuned_graph], calls)
            kept = tuned_ms <= default_ms * (1 - min_gain)
            if not kept:
                dropped |= {tuple(r[:2]) for r in tunable.get_results()} - before
            tuned.append(
                TunedGemm(
                    shape.name, m, shape.n, shape.k, shape.bias, shape.layers, default_ms, tuned_ms, kept
                )
            )
            del default_graph, tuned_graph
            bar.update(1)
    if any(t.kept for t in tuned):
        _write_results(results_path, dropped)
    else:
        results_path.unlink(missing_ok=True)
    report = {
        "format": 2,
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dtype": str(dtype).removeprefix("torch."),
        "min_gain": min_gain,
        "kept": sum(t.kept for t in tuned),
        "gemms": [asdict(t) for t in tuned],
        "step_estimate_ms": step_estimates(tuned),
    }
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2))
    return tuned


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


def step_estimates(tuned: list[TunedGemm]) -> dict[str, dict[str, float]]:
    """Per row count, the GEMM time of one forward pass (each shape times its number of layers) with
    cuBLAS's defaults and as served with the tuning file: {rows: {"default_ms": .., "tuned_ms": ..}}."""
    out: dict[str, dict[str, float]] = {}
    for t in tuned:
        entry = out.setdefault(str(t.rows), {"default_ms": 0.0, "tuned_ms": 0.0})
        entry["default_ms"] += t.default_ms * t.layers
        entry["tuned_ms"] += t.served_ms * t.layers
    return out


def load_tuning(model: str | Path | None, device: torch.device) -> bool:
    """Serve with the tuning file beside `model`, if there is one for this GPU and PyTorch; logs what
    it did. Returns whether TunableOp now dispatches from the file."""
    if model is None or device.type != "cuda" or str(model).startswith("random:"):
        return False
    directory = tuning_dir(model)
    results, report_path = directory / RESULTS_FILE, directory / REPORT_FILE
    if not report_path.is_file():
        return False
    report = json.loads(report_path.read_text())
    if not results.is_file():
        logger.info("GEMM tuning: cuBLAS's default was fastest for every GEMM tuned in %s", directory)
        return False
    here = torch.cuda.get_device_name(device)
    if report.get("device") != here or report.get("torch") != torch.__version__:
        logger.warning(
            "GEMM tuning file %s was made on %s with torch %s; this is %s with torch %s: not loaded "
            "(run `gptserve tune` again)",
            results,
            report.get("device"),
            report.get("torch"),
            here,
            torch.__version__,
        )
        return False
    from torch.cuda import tunable

    tunable.set_filename(str(results))
    tunable.enable(True)
    tunable.tuning_enable(False)
    tunable.read_file(str(results))
    gemms = report.get("gemms", [])
    kept = sum(g.get("kept", True) for g in gemms)
    logger.info(
        "GEMM tuning: loaded %d tuned GEMMs from %s (cuBLAS's default serves the other %d)",
        kept,
        results,
        len(gemms) - kept,
    )
    return True
