"""`/metrics` under vLLM's names, and a client that goes away: its request is aborted and its KV blocks
come back at once (seen through the metrics)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai

NAMES = [
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:e2e_request_latency_seconds",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:request_success_total",
    "vllm:num_preemptions_total",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
]


def metrics(url: str) -> dict[str, float]:
    """Series name (without labels, summed over them) -> value."""
    out: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            name = series.split("{", 1)[0]
            out[name] = out.get(name, 0.0) + float(value)
    return out


def wait_for(url: str, condition, timeout: float = 60.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if condition(m):
            return m
        assert time.monotonic() < deadline, f"metrics never got there: {m}"
        time.sleep(0.2)


def aborted(url: str) -> float:
    """Requests that ended by abort so far."""
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("vllm:request_success_total{") and 'finished_reason="abort"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def idle(m: dict[str, float]) -> bool:
    return m["vllm:num_requests_running"] == 0 and m["vllm:kv_cache_usage_perc"] == 0


def test_metrics_present_and_moving(server, client: openai.OpenAI, model_name: str) -> None:
    text = httpx.get(f"{server.url}/metrics").text
    for name in NAMES:
        assert name in text, name
    assert 'model_name="SmolLM2-135M-Instruct"' in text
    before = metrics(server.url)
    client.completions.create(model=model_name, prompt="Metrics move when", max_tokens=3, temperature=0)
    after = metrics(server.url)
    for name in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
                 "vllm:time_to_first_token_seconds_count", "vllm:e2e_request_latency_seconds_count",
                 "vllm:prefix_cache_queries_total"):  # fmt: skip
        assert after[name] > before.get(name, 0.0), name
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == 3


LONG = {"prompt": "Write a very long story about a dragon.", "max_tokens": 1500, "ignore_eos": True}


def test_streaming_disconnect_frees_kv(server) -> None:
    wait_for(server.url, idle)
    aborts = aborted(server.url)
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", f"{server.url}/v1/completions", json={**LONG, "stream": True}) as r,
    ):
        assert r.status_code == 200
        # One iterator for the whole read: dropping an httpx line iterator early closes the connection.
        lines = r.iter_lines()
        chunks = 0
        while chunks < 3:
            line = next(lines)
            if line.startswith("data: {"):
                assert json.loads(line[6:])["choices"][0]["finish_reason"] is None
                chunks += 1
        busy = metrics(server.url)
        assert busy["vllm:num_requests_running"] == 1 and busy["vllm:kv_cache_usage_perc"] > 0, busy
    # Leaving the block closed the connection; the request must be gone long before its 1500 tokens.
    wait_for(server.url, idle, timeout=30)
    assert aborted(server.url) == aborts + 1


def test_non_streaming_disconnect_frees_kv(server) -> None:
    wait_for(server.url, idle)
    aborts = aborted(server.url)

    async def start_and_drop() -> None:
        async with httpx.AsyncClient(timeout=60) as http:
            task = asyncio.create_task(http.post(f"{server.url}/v1/completions", json=LONG))
            deadline = time.monotonic() + 30
            while metrics(server.url)["vllm:num_requests_running"] == 0:
                assert time.monotonic() < deadline and not task.done()
                await asyncio.sleep(0.2)
            task.cancel()  # drops the connection mid-request

    asyncio.run(start_and_drop())
    wait_for(server.url, idle, timeout=30)
    assert aborted(server.url) == aborts + 1
