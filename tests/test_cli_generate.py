"""`gptserve generate` prints what `LLM.generate` returns, and bad input exits non-zero with a message."""

from __future__ import annotations

import subprocess
import sys

from gptserve import LLM, SamplingParams


def _gptserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gptserve.cli", "--log-level", "warning", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_generate_prints_greedy_text(tiny_models):
    path, _ = tiny_models["gpt2"]
    result = _gptserve("generate", str(path), "--dtype", "fp32", "-p", "x", "--max-tokens", "5")
    # The tiny model has no tokenizer: a text prompt is refused with a clear message.
    assert result.returncode != 0
    assert "tokenizer" in result.stderr


def test_generate_on_default_model():
    prompt = "The capital of France is"
    result = _gptserve("generate", "-p", prompt, "--max-tokens", "8")
    assert result.returncode == 0, result.stderr
    expected = LLM(device="cpu").generate(prompt, SamplingParams(temperature=0.0, max_tokens=8))[0]
    assert result.stdout == expected.outputs[0].text + "\n"


def test_missing_model_path_exits_with_message():
    result = _gptserve("generate", "/nonexistent/model", "-p", "hi")
    assert result.returncode == 2
    assert "/nonexistent/model" in result.stderr


def test_generate_takes_a_positional_prompt():
    prompt = "The capital of France is"
    by_flag = _gptserve("generate", "-p", prompt, "--max-tokens", "4")
    positional = _gptserve("generate", prompt, "--max-tokens", "4")
    assert positional.returncode == 0, positional.stderr
    assert positional.stdout == by_flag.stdout and positional.stdout.strip()
