"""Engine death through a real `gptserve serve` process: the requests in flight fail with 503, `/health` and
`/v2/health/ready` answer 503 (for a short grace period), and the process exits 1 within a bounded time
instead of hanging.

Nothing in the server is stubbed: the engine dies of a genuine out-of-memory error in its forward pass,
the failure a real deployment meets on an overcommitted device. The model is a one-layer GPT-J whose MLP
is 65,536 wide (a 58 MB checkpoint): a decode step needs a few hundred KB of activations, the prefill of
a 1,500-token prompt needs 393 MB for one of them. Once the server has served a first request, the test
lowers the process's address-space limit (RLIMIT_AS, what `prlimit --as` does) to 256 MiB above what it
maps. Short requests still fit; the long prompt makes torch's CPU allocator fail inside the engine
thread. (`MALLOC_ARENA_MAX` keeps glibc from reserving a 64 MiB heap per new thread, which would make the
headroom depend on how many threads the server happens to start.)
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gptserve.commands.serve import ENGINE_DEATH_GRACE_S
from tests.conftest import build_tiny_model, gpt2_tokenizer
from tests.server.conftest import ServerProcess, start_server

HEADROOM_BYTES = 256 << 20
LONG_PROMPT = [5] * 1500  # its MLP activation: 1500 x 65536 fp32 = 393 MB, beyond the headroom
SHORT = {"prompt": [5, 17, 42], "max_tokens": 2, "temperature": 0}
EXIT_WITHIN_S = 30.0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    build_tiny_model("gptj", tmp_path, vocab_size=50400, n_layer=1, n_inner=65536, n_positions=2048)
    gpt2_tokenizer().save_pretrained(tmp_path)  # text, so that a stream sends every token as it comes
    proc = start_server(str(tmp_path), "--kv-cache-memory", str(64 << 20), env={"MALLOC_ARENA_MAX": "2"})
    try:
        yield proc
    finally:
        if proc.process.poll() is None:
            proc.process.kill()
            proc.process.wait()


def _limit_address_space(pid: int, headroom: int) -> None:
    with open(f"/proc/{pid}/status") as f:
        mapped_kib = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
    _, hard = resource.prlimit(pid, resource.RLIMIT_AS)
    resource.prlimit(pid, resource.RLIMIT_AS, (mapped_kib * 1024 + headroom, hard))


def _error(response: httpx.Response) -> str:
    return response.json()["error"]["message"]


def test_engine_death_fails_requests_reports_503_and_exits_nonzero(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.url, timeout=120) as http:
        assert http.post("/v1/completions", json=SHORT).status_code == 200  # every thread is up
        _limit_address_space(server.process.pid, HEADROOM_BYTES)
        assert http.post("/v1/completions", json=SHORT).status_code == 200, "the limit leaves room to serve"

        streamed = {"prompt": [5, 17, 42], "max_tokens": 2000, "temperature": 0, "stream": True}
        with http.stream("POST", "/v1/completions", json=streamed) as stream:
            events = (line for line in stream.iter_lines() if line.startswith("data: "))
            assert "choices" in json.loads(next(events).removeprefix("data: ")), "the stream is under way"

            doomed = http.post("/v1/completions", json={"prompt": LONG_PROMPT, "max_tokens": 1})
            died_at = time.monotonic()
            assert doomed.status_code == 503, doomed.text
            assert "the engine failed" in _error(doomed) and "can't allocate memory" in _error(doomed)

            health = http.get("/health")
            assert health.status_code == 503 and "can't allocate memory" in _error(health)
            assert http.get("/v2/health/ready").status_code == 503
            assert http.get("/v2/health/live").status_code == 503
            refused = http.post("/v1/completions", json=SHORT)
            assert refused.status_code == 503 and "engine" in _error(refused)

            rest = list(events)  # the stream that was in flight ends with the error, then [DONE]
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2].removeprefix("data: "))["error"]
        assert error["type"] == "service_unavailable_error" and "can't allocate memory" in error["message"]

    status = server.process.wait(timeout=EXIT_WITHIN_S)
    assert status == 1, f"a server whose engine died exits 1, not {status}"
    # It answered 503 for the grace period, then stopped (the grace starts a moment before `died_at`).
    assert ENGINE_DEATH_GRACE_S - 0.5 <= time.monotonic() - died_at < EXIT_WITHIN_S
