"""Fixtures: the real `gptserve serve` process on a free loopback port, and clients that talk to it.

The server runs the embedded SmolLM2-135M-Instruct in fp32 with a 2048-token context. One server is
shared by the whole session; tests that need other flags start their own with `start_server`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest

STARTUP_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    process: subprocess.Popen
    url: str

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
