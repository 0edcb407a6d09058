"""Fixtures: the real `gptserve serve` process on a free loopback port, and clients that talk to it.

The server runs the embedded SmolLM2-135M-Instruct in fp32 with a 2048-token context. One server is
shared by the whole session; tests that need other flags start their own with `start_server`, or with
`start_tiny_gptj_server` over the session's tiny random GPT-J with the GPT-2 tokenizer
(`tiny_gptj_tokenized`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers import free_port

STARTUP_TIMEOUT_S = 180.0


@dataclass
class ServerProcess:
    process: subprocess.Popen
    url: str
    grpc_url: str = ""  # host:port of its gRPC endpoint, when it has one

    def stop(self) -> int:
        """SIGTERM (drain, then exit) and the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise
        return self.process.returncode


def start_server(*extra: str, env: dict[str, str] | None = None) -> ServerProcess:
    port = free_port()
    cmd = [sys.executable, "-m", "gptserve.cli", "serve", "--dtype", "fp32", "--max-model-len", "2048",
           "--host", "127.0.0.1", "--http-port", str(port), "--metrics-port", "0", "--grpc-port", "0",
           *extra]  # fmt: skip
    process = subprocess.Popen(cmd, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gptserve serve exited with {process.returncode} before it was healthy")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return ServerProcess(process, url)
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"gptserve serve was not healthy within {STARTUP_TIMEOUT_S} s")


def start_tiny_gptj_server(
    checkpoint: Path, path: Path, model: str, max_len: int, chat_template: str, *extra: str
) -> ServerProcess:
    """Serve `checkpoint` (the `tiny_gptj_tokenized` fixture: a tiny random GPT-J with the GPT-2 vocabulary
    and tokenizer) as `model` with `chat_template` (written under `path`), over HTTP and gRPC (`grpc_url`);
    `extra` are more `gptserve serve` flags. The text it generates is noise; what matters is that every
    protocol gets the same tokens."""
    template = path / "chat_template.jinja"
    template.write_text(chat_template)
    grpc_port = free_port()
    proc = start_server(
        str(checkpoint), "--served-model-name", model, "--max-model-len", str(max_len),
        "--chat-template", str(template), "--grpc-port", str(grpc_port), *extra,
    )  # fmt: skip
    proc.grpc_url = f"127.0.0.1:{grpc_port}"
    return proc


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    proc = start_server()
    yield proc
    assert proc.stop() == 0, "SIGTERM should drain and exit 0"


@pytest.fixture(scope="session")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def model_name(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id
