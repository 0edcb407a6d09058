"""A second server, started with --api-key: 401 without the right key (health and metrics stay open),
and SIGTERM while a request streams: no new connections, the request completes, exit status 0."""

from __future__ import annotations

import json
import signal
import time

import httpx
import openai
import pytest

from tests.server.conftest import ServerProcess, start_server

KEY = "sesame"


@pytest.fixture(scope="module")
def keyed_server():
    proc = start_server("--api-key", KEY)
    yield proc
    proc.stop()


def test_api_key(keyed_server: ServerProcess) -> None:
    url = f"{keyed_server.url}/v1"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    r = httpx.get(f"{url}/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(f"{url}/completions", json={"prompt": "x"}, headers={"Authorization": "Basic abc"})
    assert r.status_code == 401
    assert httpx.post(f"{keyed_server.url}/tokenize", json={"prompt": "x"}).status_code == 401
    good = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
    assert good.completions.create(model=good.models.list().data[0].id, prompt="hi", max_tokens=1).choices
    assert httpx.get(f"{keyed_server.url}/health").status_code == 200
    assert httpx.get(f"{keyed_server.url}/metrics").status_code == 200


def test_sigterm_drains_in_flight_then_exits_0(keyed_server: ServerProcess) -> None:
    body = {"prompt": "Count to fifty:", "max_tokens": 24, "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with (
        httpx.Client(timeout=120) as http,
        http.stream("POST", f"{keyed_server.url}/v1/completions", json=body, headers=headers) as r,
    ):
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: {"))
        keyed_server.process.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        with pytest.raises(httpx.ConnectError):  # no longer accepting
            httpx.get(f"{keyed_server.url}/health")
        rest = [line for line in lines if line.startswith("data: ")]
    chunks = [json.loads(line[6:]) for line in [first, *rest] if line != "data: [DONE]"]
    assert rest[-1] == "data: [DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert keyed_server.process.wait(timeout=60) == 0
