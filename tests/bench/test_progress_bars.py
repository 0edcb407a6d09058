"""Benchmarks count their work on a progress bar on standard error (`LLM.generate(use_tqdm=True)`,
`bench latency` over repeats, `bench throughput` and `bench serve` over finished requests), and draw
nothing when `gptserve.progress` says to stay quiet."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import pytest

from gptserve import progress
from gptserve.bench import serve
from gptserve.cli import main
from gptserve.llm import LLM
from gptserve.sampling_params import SamplingParams
from tests.conftest import build_tiny_model, random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
ENGINE_FLAGS = ["--device", "cpu", "--dtype", "fp32", "--max-model-len", "128"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama-progress")
    build_tiny_model("llama", path)
    return path


@pytest.fixture
def bars_shown(monkeypatch) -> None:
    """Progress bars drawn as on a terminal at `info` level."""
    monkeypatch.setattr(progress, "progress_quiet", lambda: False)


def test_generate_counts_finished_requests(tiny_llama, monkeypatch, capsys, caplog):
    llm = LLM(str(tiny_llama), device="cpu", dtype="fp32", max_model_len=128)
    prompts = random_prompts(3, 512, [5, 7, 9])
    capsys.readouterr()

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    caplog.set_level(logging.WARNING)
    llm.generate(prompts, GREEDY, use_tqdm=True)
    assert capsys.readouterr().err == ""  # quiet: a terminal, but logging above info

    monkeypatch.setattr(progress, "progress_quiet", lambda: False)
    llm.generate(prompts, GREEDY)
    assert capsys.readouterr().err == ""  # not asked for
    outputs = llm.generate(prompts, GREEDY, use_tqdm=True)
    err = capsys.readouterr().err
    assert "generate" in err and "3/3" in err
    assert [len(o.outputs[0].token_ids) for o in outputs] == [4, 4, 4]


@pytest.mark.parametrize(
    ("mode", "flags", "label", "count"),
    [
        ("latency", ["--input-len", "8", "--output-len", "4", "--repeats", "2"], "latency", "2/2"),
        ("throughput", ["--num-prompts", "3", "--min-input-len", "4", "--max-input-len", "8",
                        "--output-len", "4"], "generate", "3/3"),
    ],
)  # fmt: skip
def test_engine_benchmarks_show_progress(tiny_llama, bars_shown, capsys, mode, flags, label, count):
    assert main(["bench", mode, str(tiny_llama), *ENGINE_FLAGS, *flags]) == 0
    out, err = capsys.readouterr()
    assert f"bench {mode}" in out
    assert label in err and count in err


def test_engine_benchmark_draws_nothing_when_quiet(tiny_llama, capsys):
    assert not sys.stderr.isatty()
    assert main(["bench", "latency", str(tiny_llama), *ENGINE_FLAGS, "--input-len", "8", "--output-len",
                 "4", "--repeats", "2"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "latency:" not in err and "2/2" not in err and "\r" not in err


def test_serve_counts_completed_requests(bars_shown, monkeypatch, capsys):
    async def answer(http, url, body) -> serve.RequestResult:
        await asyncio.sleep(0)
        return serve.RequestResult(ttft=0.01, e2e=0.02, output_tokens=2, chunk_gaps=[0.01])

    monkeypatch.setattr(serve, "_one_request", answer)
    figures = asyncio.run(serve.drive("http://unused", [[1, 2]] * 5, 2, 2, desc="serve c=2"))
    err = capsys.readouterr().err
    assert figures["requests"] == 5 and "serve c=2" in err and "5/5" in err
    asyncio.run(serve.drive("http://unused", [[1, 2]] * 5, 2, 2))  # a warm-up: no bar
    assert capsys.readouterr().err == ""
