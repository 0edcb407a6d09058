"""`gptserve tune` on a GPU: the tuning files are written beside the model, and an engine started on
that model loads them and generates what it generates untuned; by default only picks that beat cuBLAS's
default are kept (GPU only)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from gptserve import LLM, SamplingParams
from gptserve.cli import main
from gptserve.tuning.gemm_tuner import REPORT_FILE, RESULTS_FILE

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
    assert all(g["default_ms"] > 0 and g["tuned_ms"] > 0 and g["kept"] for g in report["gemms"])
    lines = (model / RESULTS_FILE).read_text().splitlines()
    assert any(line.startswith("Validator,PT_VERSION") for line in lines)
    assert any(line.startswith("Gemm") for line in lines)

    with caplog.at_level(logging.INFO, logger="gptserve.tuning.gemm_tuner"):
        tuned = LLM(str(model), device="cuda", dtype="fp16")
    assert "GEMM tuning: loaded" in caplog.text
    assert torch.cuda.tunable.is_enabled() and not torch.cuda.tunable.tuning_is_enabled()
    assert tuned.generate([prompt], params)[0].outputs[0].token_ids == untuned


def test_tune_keeps_only_winning_picks(tmp_path, tiny_models, caplog, tunable_off):
    import shutil

    src, _ = tiny_models["gptj"]
    model = tmp_path / "gptj"
    shutil.copytree(src, model)
    assert main(["tune", str(model), "--batch-sizes", "1,4", "--max-input-len", "32"]) == 0
    report = json.loads((model / REPORT_FILE).read_text())
    for g in report["gemms"]:
        assert g["kept"] == (g["tuned_ms"] <= g["default_ms"] * (1 - report["min_gain"]))
    assert report["kept"] == sum(g["kept"] for g in report["gemms"])
    assert (model / RESULTS_FILE).is_file() == (report["kept"] > 0)
    with caplog.at_level(logging.INFO, logger="gptserve.tuning.gemm_tuner"):
        LLM(str(model), device="cuda", dtype="fp16")
    if report["kept"]:
        assert f"GEMM tuning: loaded {report['kept']} tuned GEMMs" in caplog.text
    else:
        assert "cuBLAS's default was fastest for every GEMM" in caplog.text
        assert not torch.cuda.tunable.is_enabled()
