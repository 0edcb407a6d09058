"""The GEMM tuning files beside a model (`gptserve tune` writes them), and loading them when serving.

- `gptserve-gemm-tuning.csv`: the TunableOp picks that serve, in TunableOp's format (read by
  `torch.cuda.tunable`); absent when none serves;
- `gptserve-gemm-tuning.json`: the report: the GPU and software it was tuned on and, for each GEMM, what
  serves it (cuBLAS's default, TunableOp's pick or a Triton configuration, which it names).

Serving with them switches TunableOp on with tuning off, so each GEMM dispatches to its pick in eager steps
and inside CUDA graphs alike, and wraps the layers with Triton picks (`apply_tuned_configs`). A file tuned
on another GPU model or PyTorch version is not loaded (the log says why).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from gptserve.layers.tuned_linear import apply_tuned_configs

logger = logging.getLogger(__name__)

RESULTS_FILE = "gptserve-gemm-tuning.csv"
REPORT_FILE = "gptserve-gemm-tuning.json"


def tuning_dir(model: str | Path) -> Path:
    """Where a model's tuning file goes: its directory, or the directory of a single-file checkpoint."""
    path = Path(model)
    return path if path.is_dir() else path.parent


def load_tuning(model: str | Path | None, device: torch.device, net: torch.nn.Module | None = None) -> bool:
    """Serve with the tuning files beside `model`, if there are some for this GPU and PyTorch: TunableOp
    dispatches from its file, `net`'s layers with Triton picks are wrapped to run them and row counts
    given to cuBLAS or TunableOp leave any default Triton kernel; logs what it did. Returns whether
    anything tuned now serves."""
    if model is None or device.type != "cuda" or str(model).startswith("random:"):
        return False
    directory = tuning_dir(model)
    results, report_path = directory / RESULTS_FILE, directory / REPORT_FILE
    if not report_path.is_file():
        return False
    report = json.loads(report_path.read_text())
    here = torch.cuda.get_device_name(device)
    if report.get("device") != here or report.get("torch") != torch.__version__:
        logger.warning(
            "GEMM tuning file %s was made on %s with torch %s; this is %s with torch %s: not loaded "
            "(run `gptserve tune` again)",
            report_path,
            report.get("device"),
            report.get("torch"),
            here,
            torch.__version__,
        )
        return False
    gemms = report.get("gemms", [])
    picks = [g for g in gemms if g.get("served") == "triton" and g.get("triton_config")]
    wrapped = 0 if net is None else apply_tuned_configs(net, gemms)
    tunableop = results.is_file()
    if tunableop:
        from torch.cuda import tunable

        tunable.set_filename(str(results))
        tunable.enable(True)
        tunable.tuning_enable(False)
        tunable.read_file(str(results))
    if not tunableop and not wrapped:
        logger.info("GEMM tuning: cuBLAS's default was fastest for every GEMM tuned in %s", directory)
        return False
    kept = sum(
        g.get("served", "tunableop" if g.get("kept", True) else "cublas") == "tunableop" for g in gemms
    )
    logger.info(
        "GEMM tuning: loaded %d tuned GEMMs from %s: %d TunableOp picks, %d Triton configurations "
        "(%d layers); cuBLAS's default serves the other %d",
        kept + len(picks),
        directory,
        kept,
        len(picks),
        wrapped,
        len(gemms) - kept - len(picks),
    )
    return True
