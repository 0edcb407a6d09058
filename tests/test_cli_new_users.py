"""The first hour with gptserve (issue 21): `--port`, ports checked before anything loads (one line,
exit 2), sampling flags checked before the model loads, help texts with defaults, and `--log-level`
before or after any sub-command. Every test runs `python -m gptserve.cli` as a user would."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.helpers import free_port
from tests.server.conftest import STARTUP_TIMEOUT_S

MISSING_MODEL = "/nonexistent/model"  # loading it would fail: an error naming a flag proves nothing loaded


def gptserve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gptserve.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "serving" not in result.stdout
    return lines[0]


@pytest.mark.parametrize("flag", ["--http-port", "--port", "--grpc-port", "--metrics-port"])
def test_out_of_range_port_is_one_line_before_loading(flag):
    line = one_error_line(gptserve("serve", MISSING_MODEL, flag, "99999"))
    named = "--http-port" if flag == "--port" else flag
    assert named in line and "99999" in line and "1-65535" in line
    assert MISSING_MODEL not in line


@pytest.mark.parametrize("flag", ["--http-port", "--port", "--grpc-port", "--metrics-port"])
def test_busy_port_is_one_line_before_loading(flag):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        others = {"--grpc-port": "0", "--metrics-port": "0"}
        others.pop(flag, None)
        if flag not in ("--http-port", "--port"):
            others["--http-port"] = str(free_port())
        extra = [x for kv in others.items() for x in kv]
        start = time.monotonic()
        line = one_error_line(
            gptserve("serve", MISSING_MODEL, "--host", "127.0.0.1", flag, str(port), *extra)
        )
        assert time.monotonic() - start < 60
    named = "--http-port" if flag == "--port" else flag
    assert named in line and str(port) in line and "already in use" in line
    assert MISSING_MODEL not in line


def test_same_port_twice_is_refused():
    port = str(free_port())
    line = one_error_line(gptserve("serve", MISSING_MODEL, "--http-port", port, "--grpc-port", port))
    assert "--grpc-port" in line and "--http-port" in line and port in line


def test_port_serves_and_banner_comes_once_bound(tiny_gptj_tokenized):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "gptserve.cli", "serve", str(tiny_gptj_tokenized), "--dtype", "fp32",
         "--port", str(port), "--grpc-port", "0", "--metrics-port", "0", "--log-level", "warning"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        banner = [process.stdout.readline() for _ in range(9)]  # type: ignore[union-attr]
        assert banner[0].startswith("gptserve: serving"), banner
        assert any(f"http://127.0.0.1:{port}/v1" in line for line in banner), banner
        # The banner is printed only once the port is bound: it answers at once.
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=STARTUP_TIMEOUT_S).status_code == 200
    finally:
        process.terminate()
        process.communicate(timeout=60)
    assert process.returncode == 0


@pytest.mark.parametrize(
    ("flag", "value", "range_"),
    [("--max-tokens", "-5", "positive"), ("--temperature", "-1", "[0, 100]"), ("--top-p", "2", "(0, 1]"),
     ("--top-k", "-3", "-1, 0 or positive"), ("--n", "0", "[1, 128]")],
)  # fmt: skip
def test_generate_refuses_sampling_flags_before_loading(flag, value, range_):
    line = one_error_line(gptserve("generate", MISSING_MODEL, "-p", "hi", flag, value))
    assert line.startswith(f"gptserve generate: error: {flag} ") and range_ in line, line
    line = one_error_line(gptserve("generate", "hi", flag, value))  # the positional prompt too
    assert flag in line


@pytest.mark.parametrize(
    ("flag", "value"), [("--max-tokens", "-5"), ("--temperature", "-1"), ("--top-p", "2"), ("--top-k", "-3")]
)
def test_chat_refuses_sampling_flags_before_loading(flag, value):
    line = one_error_line(gptserve("chat", MISSING_MODEL, flag, value))
    assert line.startswith(f"gptserve chat: error: {flag} "), line


HELP_OPTION = re.compile(r"^  (-\S+)")


def _help_entries(text: str) -> dict[str, str]:
    """Each option of a help page and its (joined) help text."""
    entries: dict[str, str] = {}
    current = None
    for line in text.split("\n\n", 2)[-1].splitlines():
        match = HELP_OPTION.match(line)
        if match:
            current = match.group(1).rstrip(",")
            entries[current] = line[match.end() :]
        elif current and line.startswith("    "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


@pytest.mark.parametrize("command", ["serve", "generate", "chat"])
def test_every_flag_has_help_with_its_default(command):
    result = gptserve(command, "--help")
    assert result.returncode == 0
    entries = _help_entries(result.stdout)
    assert "--max-num-seqs" in entries and "--log-level" in entries
    for flag, text in entries.items():
        if flag == "-h":
            continue
        words = re.sub(r"^\S*(\s+\S+)?", "", text).strip() if "  " not in text else text
        assert words, f"{command} {flag} has no help"
    for flag in ("--device", "--max-num-seqs", "--block-size", "--log-level"):
        assert "(default: " in entries[flag], (flag, entries[flag])
    if command == "serve":
        assert "(default: 8000)" in entries["--http-port"] and "--port" in result.stdout
        assert "(default: 8001)" in entries["--grpc-port"] and "(default: 8002)" in entries["--metrics-port"]
    if command != "serve":
        assert "(default: " in entries["--max-tokens"] and "(default: " in entries["--temperature"]


def test_chat_help_lists_slash_commands_on_lines():
    out = gptserve("chat", "--help").stdout
    for command in ("/system", "/reset", "/history", "/help", "/exit"):
        assert re.search(rf"^\s+{command}\b", out, re.MULTILINE), command


def test_bench_help_has_whole_sentences():
    out = gptserve("bench", "--help").stdout
    text = " ".join(out.split())
    for mode in ("latency", "throughput", "serve", "load"):
        described = re.search(rf"\b{mode} +([A-Z][^.]*\.)", text)
        assert described, (mode, out)


@pytest.mark.parametrize(
    "argv",
    [["serve"], ["generate", "-p", "x"], ["chat"], ["client"], ["convert", "a", "b"], ["tune", "m"],
     ["bench", "latency"], ["bench", "serve"]],
)  # fmt: skip
def test_log_level_after_any_subcommand(argv):
    # An unknown value is refused by name: the flag is recognised after the sub-command.
    result = gptserve(*argv, "--log-level", "loud")
    assert result.returncode == 2
    assert "argument --log-level: invalid choice: 'loud'" in result.stderr
    # ... and before it.
    result = gptserve("--log-level", "loud", *argv)
    assert "argument --log-level: invalid choice: 'loud'" in result.stderr


@pytest.mark.parametrize("value", [[], ["true"]])
def test_exit_on_error_stops_at_a_model_that_fails_to_load(tmp_path, value):
    """Triton's `--exit-on-error`: a repository model that fails to load ends start-up, naming it."""
    cmodel = tmp_path / "c-model"
    cmodel.mkdir()
    (cmodel / "config.ini").write_text("[gptj]\n")  # no weights
    model = tmp_path / "repo" / "fastertransformer"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(
        'name: "fastertransformer"\nbackend: "fastertransformer"\nmax_batch_size: 8\n'
        'input [ { name: "input_ids" data_type: TYPE_UINT32 dims: [ -1 ] } ]\n'
        'output [ { name: "output_ids" data_type: TYPE_UINT32 dims: [ -1, -1 ] } ]\n'
        f'parameters {{ key: "model_checkpoint_path" value: {{ string_value: "{cmodel}" }} }}\n'
    )
    flag = "--exit-on-error" if not value else f"--exit-on-error={value[0]}"
    result = gptserve(
        "serve", "--model-repository", str(tmp_path / "repo"), flag, "--device", "cpu",
        "--http-port", str(free_port()), "--grpc-port", "0", "--metrics-port", "0",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "model 'fastertransformer' version 1 failed to load" in result.stderr
    assert "Traceback" not in result.stderr and "serving" not in result.stdout


def test_exit_on_error_takes_tritons_values():
    result = gptserve("serve", MISSING_MODEL, "--exit-on-error=maybe")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "--exit-on-error" in last and "true or false" in last
