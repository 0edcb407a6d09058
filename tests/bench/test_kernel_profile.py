"""`bench latency --profile` and `bench throughput --profile`: the profiled window's time per engine step,
grouped by kind of operation, in the printed table and the JSON figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gptserve.bench.kernel_profile import kind_of
from gptserve.cli import main

ENGINE_FLAGS = ["--device", "cpu", "--dtype", "fp32", "--max-model-len", "128"]


@pytest.fixture(scope="module")
def tiny_gptj(tiny_models) -> Path:
    return tiny_models["gptj"][0]


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("ncclDevKernel_AllReduce_Sum_f16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "communication"),
        ("gloo:broadcast", "communication"),
        ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize64x64x64", "matmul"),
        ("nvjet_hsh_64x8_64x16_2x1_v_bz_splitK_TNT", "matmul"),
        ("aten::addmm", "matmul"),
        ("_paged_decode_kernel", "attention"),
        ("_write_kv_kernel", "attention"),
        ("_int8_gemv_kernel", "matmul"),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128>>", "attention"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "other"),
        ("aten::layer_norm", "other"),
    ],
)
def test_kernel_kinds(name, kind):
    assert kind_of(name) == kind


def test_latency_profile_counts_the_decode_steps(tiny_gptj, tmp_path, capsys):
    figures = tmp_path / "latency.json"
    flags = ["--input-len", "8", "--output-len", "6", "--repeats", "1", "--profile", "--json", str(figures)]
    assert main(["bench", "latency", str(tiny_gptj), *ENGINE_FLAGS, *flags]) == 0
    out = capsys.readouterr().out
    assert "profile (CPU operators)" in out and "6 steps" in out  # the prefill and 5 decode steps
    # the largest operators of the "other" kind are named under it
    other = out.splitlines()[
        [i for i, line in enumerate(out.splitlines()) if line.startswith("  other")][0] + 1
    ]
    assert other.startswith("    aten::") and "calls a step" in other
    profile = json.loads(figures.read_text())["profile"]
    assert profile["device"] == "cpu" and profile["steps"] == 6
    assert profile["ms_per_step"]["matmul"] > 0
    assert profile["calls"]["matmul"] >= 6 * 2  # every step runs the layers' projections


def test_throughput_profile_reruns_one_batch(tiny_gptj, tmp_path, capsys):
    figures = tmp_path / "throughput.json"
    flags = ["--num-prompts", "6", "--min-input-len", "4", "--max-input-len", "8", "--output-len", "3"]
    flags += ["--max-num-seqs", "4", "--profile", "--json", str(figures)]
    assert main(["bench", "throughput", str(tiny_gptj), *ENGINE_FLAGS, *flags]) == 0
    assert "profile (CPU operators)" in capsys.readouterr().out
    profile = json.loads(figures.read_text())["profile"]
    # 4 prompts, at most 4 sequences a step: at least one prefill step and 2 decode steps
    assert profile["steps"] >= 3
    assert profile["ms_per_step"]["matmul"] > 0
