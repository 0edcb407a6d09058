"""`gptserve tune` on a GPU: TunableOp's picks and the Triton configurations are timed, the tuning files
are written beside the model, and an engine started on that model loads them (TunableOp's file, layers
wrapped for their Triton picks) and generates what it generates untuned; by default only what beats
cuBLAS's default serves (GPU only)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from gptserve import LLM, SamplingParams
from gptserve.cli import main
from gptserve.layers.tuned_linear import TunedLinear
from gptserve.layers.tuning_file import REPORT_FILE, RESULTS_FILE

pytestmark = pytest.mark.gpu


@pytest.fixture
def tunable_off():
    yield
    torch.cuda.tunable.enable(False)  # loading a tuning file switches TunableOp on for the process


def test_tune_writes_the_file_and_serve_loads_it(tmp_path, tiny_models, caplog, tunable_off):
    import shutil

    src, _ = tiny_models["gptj"]
    model = tmp_path / "gptj"
    shutil.copytree(src, model)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompt = [5, 17, 42, 7]
    untuned = LLM(str(model), device="cuda", dtype="fp16").generate([prompt], params)[0].outputs[0].token_ids

    assert main(["tune", str(model), "--batch-sizes", "1,4", "--max-input-len", "32", "--keep", "all"]) == 0
    report = json.loads((model / REPORT_FILE).read_text())
    assert report["device"] == torch.cuda.get_device_name()
    assert {g["rows"] for g in report["gemms"]} >= {1, 4, 32}
    for g in report["gemms"]:  # both searches ran, and the faster of them serves
        assert g["default_ms"] > 0 and g["tuned_ms"] > 0 and g["triton_ms"] > 0
        assert set(g["triton_config"]) == {
            "block_m",
            "block_n",
            "block_k",
            "split_k",
            "num_warps",
            "num_stages",
        }
        assert g["served"] == ("triton" if g["triton_ms"] < g["tuned_ms"] else "tunableop")
        assert g["kept"] == (g["served"] == "tunableop")
    if report["served"]["tunableop"]:
        lines = (model / RESULTS_FILE).read_text().splitlines()
        assert any(line.startswith("Validator,PT_VERSION") for line in lines)
        assert any(line.startswith("Gemm") for line in lines)

    with caplog.at_level(logging.INFO, logger="gptserve.layers.tuning_file"):
        tuned = LLM(str(model), device="cuda", dtype="fp16")
    assert f"GEMM tuning: loaded {len(report['gemms'])} tuned GEMMs" in caplog.text
    if report["served"]["tunableop"]:
        assert torch.cuda.tunable.is_enabled() and not torch.cuda.tunable.tuning_is_enabled()
    wrapped = [m for m in tuned.engine.runner.model.modules() if isinstance(m, TunedLinear)]
    assert bool(wrapped) == bool(report["served"]["triton"])
    assert tuned.generate([prompt], params)[0].outputs[0].token_ids == untuned


def test_tune_keeps_only_winning_picks(tmp_path, tiny_models, caplog, tunable_off):
    import shutil

    src, _ = tiny_models["gptj"]
    model = tmp_path / "gptj"
    shutil.copytree(src, model)
    assert main(["tune", str(model), "--batch-sizes", "1,4", "--max-input-len", "32"]) == 0
    report = json.loads((model / REPORT_FILE).read_text())
    for g in report["gemms"]:
        best = min(g["tuned_ms"], g["triton_ms"])
        wins = best <= g["default_ms"] * (1 - report["min_gain"])
        assert g["served"] == ("cublas" if not wins else "triton" if best == g["triton_ms"] else "tunableop")
    assert report["kept"] == sum(g["served"] == "tunableop" for g in report["gemms"])
    assert (model / RESULTS_FILE).is_file() == (report["kept"] > 0)
    with caplog.at_level(logging.INFO, logger="gptserve.layers.tuning_file"):
        LLM(str(model), device="cuda", dtype="fp16")
    served = report["served"]["tunableop"] + report["served"]["triton"]
    if served:
        assert f"GEMM tuning: loaded {served} tuned GEMMs" in caplog.text
    else:
        assert "cuBLAS's default was fastest for every GEMM" in caplog.text
        assert not torch.cuda.tunable.is_enabled()
