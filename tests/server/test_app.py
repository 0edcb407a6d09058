"""The app in-process over a tiny random Llama: the queue limit (503 + Retry-After) and a dead engine
(503 on requests and on /health). The engine is held or broken on purpose, which a real server process
cannot be made to do from outside."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

from gptserve import LLM
from gptserve.app import ServerConfig, build_app

BODY = {"prompt": [5, 17, 42, 7], "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def llm(tiny_models) -> LLM:
    path, _ = tiny_models["llama"]
    return LLM(str(path), dtype="fp32", device="cpu", max_model_len=128, num_kv_blocks=64, block_size=8)


def _serve(llm: LLM, config: ServerConfig, body) -> None:
    async def main() -> None:
        app = build_app(llm.engine, config)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
                await body(http)

    asyncio.run(main())


def test_queue_limit_is_503_with_retry_after(llm: LLM) -> None:
    gate = threading.Event()
    step = llm.engine.core.step

    def held_step():
        gate.wait()
        return step()

    async def body(http: httpx.AsyncClient) -> None:
        llm.engine.core.step = held_step
        try:
            first = [asyncio.create_task(http.post("/v1/completions", json=BODY)) for _ in range(2)]
            await asyncio.sleep(0.2)  # both are queued behind the held step
            refused = await http.post("/v1/completions", json=BODY)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "queue_full"
        finally:
            gate.set()
            del llm.engine.core.step
        assert [r.status_code for r in await asyncio.gather(*first)] == [200, 200]

    _serve(llm, ServerConfig(max_queue_len=2), body)


def test_dead_engine_is_503(llm: LLM) -> None:
    def broken_step():
        raise RuntimeError("simulated device failure")

    async def body(http: httpx.AsyncClient) -> None:
        assert (await http.get("/health")).status_code == 200
        llm.engine.core.step = broken_step
        try:
            r = await http.post("/v1/completions", json=BODY)
            assert r.status_code == 503 and "simulated" in r.json()["error"]["message"]
            health = await http.get("/health")
            assert health.status_code == 503 and "simulated" in health.json()["error"]["message"]
            assert (await http.post("/v1/completions", json=BODY)).status_code == 503
        finally:
            del llm.engine.core.step
            for request_id in list(llm.engine.core.requests):
                llm.engine.abort_request(request_id)

    _serve(llm, ServerConfig(), body)
