"""The engine flags every command shares map onto `EngineOptions`; `--async-scheduling` takes auto, on or
off, `--gemv` auto, triton or cublas, and anything else is refused by name (by the engine too)."""

from __future__ import annotations

import argparse

import pytest

from gptserve.cli import add_engine_args, engine_options
from gptserve.engine.builder import build_engine
from gptserve.engine.engine_options import EngineOptions
from gptserve.errors import GptServeError


def _options(*argv: str):
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    return engine_options(parser.parse_args(list(argv)))


@pytest.mark.parametrize(("flag", "value"), [((), None), (("--async-scheduling", "on"), True),
                                             (("--async-scheduling", "off"), False)])  # fmt: skip
def test_async_scheduling_flag(flag, value):
    assert _options(*flag).async_scheduling is value


def test_bad_async_scheduling_value_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _options("--async-scheduling", "sometimes")
    assert exit_info.value.code == 2
    assert "--async-scheduling" in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "value"), [((), "auto"), (("--gemv", "cublas"), "cublas"),
                                             (("--gemv", "triton"), "triton")])  # fmt: skip
def test_gemv_flag(flag, value):
    assert _options(*flag).gemv == value


def test_bad_gemv_value_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _options("--gemv", "cutlass")
    assert exit_info.value.code == 2
    assert "--gemv" in capsys.readouterr().err
    with pytest.raises(GptServeError, match="gemv must be auto, triton or cublas, got 'cutlass'"):
        build_engine(None, EngineOptions(device="cpu", gemv="cutlass"))
