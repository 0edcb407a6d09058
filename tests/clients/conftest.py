"""Fixtures: one real `gptserve serve` process shared by the client, chat and web page tests.

It serves a tiny random GPT-J with the GPT-2 tokenizer (the text is noise; what matters is that every
protocol gets the same tokens) and a small chat template, over HTTP and gRPC.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.conftest import ServerProcess, start_tiny_gptj_server

MODEL = "tiny"
MAX_LEN = 4096
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_server(tiny_gptj_tokenized, tmp_path_factory) -> Iterator[ServerProcess]:
    path = tmp_path_factory.mktemp("tiny-gptj-clients")
    proc = start_tiny_gptj_server(tiny_gptj_tokenized, path, MODEL, MAX_LEN, CHAT_TEMPLATE)
    try:
        yield proc
    finally:
        assert proc.stop() == 0


def gptserve(*args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `gptserve ARGS...` as a user would and capture what it prints."""
    return subprocess.run(
        [sys.executable, "-m", "gptserve.cli", *args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=Path(__file__).resolve().parents[2],
    )
