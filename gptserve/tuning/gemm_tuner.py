"""Tune a model's GEMMs on this GPU with PyTorch TunableOp, and load the result when serving.

FasterTransformer's `gpt_gemm` timed every cuBLAS algorithm for each GEMM shape of GPT-J and wrote the
winners to `gemm_config.in`. Here PyTorch's TunableOp does the search: for each (rows, n, k) shape the
model runs it times cuBLAS's default and the cuBLASLt algorithms, keeps the fastest, and writes the
winners to a CSV file; serving with that file loaded (tuning itself off) dispatches each GEMM to its
winner, in eager steps and inside CUDA graphs alike. The tuning file sits beside the model:

- `gptserve-gemm-tuning.csv`: TunableOp's results (its own format, read by `torch.cuda.tunable`);
- `gptserve-gemm-tuning.json`: what was tuned, on which GPU and software, and each GEMM's time with
  cuBLAS's default and tuned, with the step-time estimate those give.

A file tuned on another GPU model or PyTorch version is not loaded (serve logs why).
"""

from __future__ import annotations

import json
import logging
import statistics
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
TIMED_REPEATS = 30


@dataclass
class TunedGemm:
    name: str
    rows: int
    n: int
    k: int
    bias: bool
    layers: int
    default_ms: float
    tuned_ms: float


def tuning_dir(model: str | Path) -> Path:
    """Where a model's tuning file goes: its directory, or the directory of a single-file checkpoint."""
    path = Path(model)
    return path if path.is_dir() else path.parent


def _time_ms(fn: Any, repeats: int = TIMED_REPEATS) -> float:
    """Median milliseconds of `fn()` on the current stream (CUDA events), after two warm-up calls."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def tune_gemms(
    shapes: list[GemmShape],
    rows: list[int],
    dtype: torch.dtype,
    out_dir: Path,
    device: torch.device,
    max_tuning_ms: int = 30,
) -> list[TunedGemm]:
    """Tune every (shape, row count) and write both files into `out_dir`; returns the timings."""
    from torch.cuda import tunable

    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / RESULTS_FILE
    results_path.unlink(missing_ok=True)  # tune afresh: TunableOp would read earlier winners back
    tunable.set_filename(str(results_path))  # TunableOp's own reads and writes go here, not to the CWD
    problems = [(shape, m) for shape in shapes for m in rows]
    tuned: list[TunedGemm] = []
    tunable.enable(False)
    with torch.inference_mode(), progress_bar(len(problems), "tuning GEMMs", "gemm") as bar:
        for shape, m in problems:
            x = torch.randn(m, shape.k, device=device, dtype=dtype)
            w = torch.randn(shape.n, shape.k, device=device, dtype=dtype) * 0.02
            b = torch.randn(shape.n, device=device, dtype=dtype) if shape.bias else None

            def gemm(x=x, w=w, b=b) -> torch.Tensor:
                return F.linear(x, w, b)

            default_ms = _time_ms(gemm)
            tunable.enable(True)
            tunable.tuning_enable(True)
            tunable.set_max_tuning_duration(max_tuning_ms)
            gemm()  # TunableOp searches this shape now
            tunable.tuning_enable(False)
            tuned_ms = _time_ms(gemm)
            tunable.enable(False)
            tuned.append(
                TunedGemm(shape.name, m, shape.n, shape.k, shape.bias, shape.layers, default_ms, tuned_ms)
            )
            bar.update(1)
    _write_results(results_path)
    report = {
        "format": 1,
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dtype": str(dtype).removeprefix("torch."),
        "gemms": [asdict(t) for t in tuned],
        "step_estimate_ms": step_estimates(tuned),
    }
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2))
    return tuned


def _write_results(path: Path) -> None:
    """TunableOp's results in its CSV format: the validator lines (software versions the results hold
    for), then one line per tuned operation: operator, parameters, solution, milliseconds."""
    from torch.cuda import tunable

    lines = [f"Validator,{name},{value}" for name, value in tunable.get_validators()]
    lines += [",".join(str(field) for field in result) for result in tunable.get_results()]
    path.write_text("\n".join(lines) + "\n")


def step_estimates(tuned: list[TunedGemm]) -> dict[str, dict[str, float]]:
    """Per row count, the GEMM time of one forward pass (each shape times its number of layers) with
    cuBLAS's defaults and tuned: {rows: {"default_ms": .., "tuned_ms": ..}}."""
    out: dict[str, dict[str, float]] = {}
    for t in tuned:
        entry = out.setdefault(str(t.rows), {"default_ms": 0.0, "tuned_ms": 0.0})
        entry["default_ms"] += t.default_ms * t.layers
        entry["tuned_ms"] += t.tuned_ms * t.layers
    return out


def load_tuning(model: str | Path | None, device: torch.device) -> bool:
    """Serve with the tuning file beside `model`, if there is one for this GPU and PyTorch; logs what
    it did. Returns whether TunableOp now dispatches from the file."""
    if model is None or device.type != "cuda" or str(model).startswith("random:"):
        return False
    directory = tuning_dir(model)
    results, report_path = directory / RESULTS_FILE, directory / REPORT_FILE
    if not results.is_file() or not report_path.is_file():
        return False
    report = json.loads(report_path.read_text())
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
    logger.info("GEMM tuning: loaded %d tuned GEMMs from %s", len(report.get("gemms", [])), results)
    return True
