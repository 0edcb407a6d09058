"""The engine flags every command shares map onto `EngineOptions`; `--async-scheduling` takes auto, on or
off, and anything else is refused by name."""

from __future__ import annotations

import argparse

import pytest

from gptserve.cli import add_engine_args, engine_options


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
