"""Server limits, in-process over a tiny random Llama: the queue limit on KServe v2 HTTP (503 +
Retry-After) and gRPC (RESOURCE_EXHAUSTED), the per-request timeout on every protocol (the request is
aborted and its KV blocks freed), the request body limit (413, declared or chunked) and CORS only with
allowed origins. The engine is held or slowed on purpose, which a real server process cannot be made to
do from outside."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import numpy as np
import pytest
import tritonclient.grpc.aio as grpcaio
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from gptserve import LLM
from gptserve.app import ServerConfig, build_app
from tests.server.conftest import free_port

BODY = {"prompt": [5, 17, 42, 7], "max_tokens": 2, "temperature": 0}
KSERVE = {
    "inputs": [
        {"name": "input_ids", "datatype": "UINT32", "shape": [1, 4], "data": [5, 17, 42, 7]},
        {"name": "input_lengths", "datatype": "UINT32", "shape": [1, 1], "data": [4]},
        {"name": "request_output_len", "datatype": "UINT32", "shape": [1, 1], "data": [2]},
    ]
}
MODEL = "tiny"
REFUSED_WITHIN = 10.0  # seconds
ABORTED_WITHIN = 3.0  # seconds: far less than the slowed request would take to finish on its own


@pytest.fixture(scope="module")
def llm(tiny_models) -> LLM:
    path, _ = tiny_models["llama"]
    return LLM(str(path), dtype="fp32", device="cpu", max_model_len=128, num_kv_blocks=64, block_size=8)


def serve(llm: LLM, config: ServerConfig, body: Callable[[httpx.AsyncClient], Awaitable[None]]) -> None:
    config.served_model_names = [MODEL]

    async def main() -> None:
        app = build_app(llm.engine, config)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as http:
                await body(http)

    asyncio.run(main())


def grpc_inputs(output_len: int) -> list[InferInput]:
    arrays = {
        "input_ids": np.array([[5, 17, 42, 7]], np.uint32),
        "input_lengths": np.array([[4]], np.uint32),
        "request_output_len": np.array([[output_len]], np.uint32),
    }
    out = []
    for name, data in arrays.items():
        tensor = InferInput(name, list(data.shape), "UINT32")
        tensor.set_data_from_numpy(data)
        out.append(tensor)
    return out


async def idle(llm: LLM, within: float = 30.0) -> None:
    """Wait until the engine holds no request and no KV block."""
    deadline = time.monotonic() + within
    while llm.engine.core.requests or llm.engine.core.kv.usage > 0:
        assert time.monotonic() < deadline, "the engine kept requests or KV blocks"
        await asyncio.sleep(0.05)


class HeldEngine:
    """Holds the engine's next step until `release()`, so requests pile up in its queue."""

    def __init__(self, llm: LLM):
        self.llm = llm
        self.gate = threading.Event()
        step = llm.engine.core.step

        def held_step():
            self.gate.wait()
            return step()

        llm.engine.core.step = held_step

    def release(self) -> None:
        self.gate.set()
        del self.llm.engine.core.step


def slow_steps(llm: LLM, seconds: float) -> Callable[[], None]:
    """Make every engine step take `seconds`; returns the undo."""
    step = llm.engine.core.step

    def slow_step():
        time.sleep(seconds)
        return step()

    llm.engine.core.step = slow_step
    return lambda: delattr(llm.engine.core, "step")


def test_queue_limit_on_kserve_http_and_grpc(llm: LLM) -> None:
    port = free_port()

    async def body(http: httpx.AsyncClient) -> None:
        held = HeldEngine(llm)
        grpc = grpcaio.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            first = [asyncio.create_task(http.post("/v1/completions", json=BODY)) for _ in range(2)]
            await asyncio.sleep(0.2)  # both are queued behind the held step
            # A refusal is immediate; without the limit these would wait behind the held step.
            refused = await asyncio.wait_for(
                http.post(f"/v2/models/{MODEL}/infer", json=KSERVE), REFUSED_WITHIN
            )
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert "queue limit" in refused.json()["error"]
            with pytest.raises(InferenceServerException) as info:
                await grpc.infer(MODEL, grpc_inputs(2), client_timeout=REFUSED_WITHIN)
            assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
            assert "queue limit" in info.value.message()
        finally:
            held.release()
        assert [r.status_code for r in await asyncio.gather(*first)] == [200, 200]
        assert (await http.post(f"/v2/models/{MODEL}/infer", json=KSERVE)).status_code == 200
        result = await grpc.infer(MODEL, grpc_inputs(2))
        assert result.as_numpy("sequence_length")[0, 0] == 6
        await grpc.close()

    serve(llm, ServerConfig(max_queue_len=2, grpc_port=port), body)


def test_request_timeout_aborts_and_frees_kv(llm: LLM) -> None:
    port = free_port()
    long = {**BODY, "max_tokens": 100}

    async def sse_lines(http: httpx.AsyncClient) -> list[str]:
        async with http.stream("POST", "/v1/completions", json={**long, "stream": True}) as r:
            assert r.status_code == 200
            return [line async for line in r.aiter_lines() if line]

    async def body(http: httpx.AsyncClient) -> None:
        undo = slow_steps(llm, 0.1)  # 100 tokens take 10 s; the limit is 0.5 s
        grpc = grpcaio.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            r = await http.post("/v1/completions", json=long)
            assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout"
            assert "--request-timeout" in r.json()["error"]["message"]
            await idle(llm, ABORTED_WITHIN)
            lines = await sse_lines(http)
            assert "request_timeout" in lines[-2] and lines[-1] == "data: [DONE]"
            await idle(llm, ABORTED_WITHIN)
            kserve = {"inputs": [*KSERVE["inputs"][:2], {**KSERVE["inputs"][2], "data": [100]}]}
            r = await http.post(f"/v2/models/{MODEL}/infer", json=kserve)
            assert r.status_code == 408 and "--request-timeout" in r.json()["error"]
            await idle(llm, ABORTED_WITHIN)
            with pytest.raises(InferenceServerException) as info:
                await grpc.infer(MODEL, grpc_inputs(100))
            assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
            await idle(llm, ABORTED_WITHIN)
            assert (await http.post("/v1/completions", json=BODY)).status_code == 200
            metrics = (await http.get("/metrics")).text
            assert 'vllm:kv_cache_usage_perc{model_name="tiny"} 0.0' in metrics
        finally:
            undo()
            await grpc.close()

    serve(llm, ServerConfig(request_timeout=0.5, grpc_port=port), body)


def test_body_limit_is_413_in_each_routes_form(llm: LLM) -> None:
    async def chunked(payload: bytes) -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 1000):
            yield payload[i : i + 1000]

    async def body(http: httpx.AsyncClient) -> None:
        big = {**BODY, "prompt": "x" * 5000}
        r = await http.post("/v1/completions", json=big)
        assert r.status_code == 413 and "4096 bytes" in r.json()["error"]["message"]
        assert r.json()["error"]["type"] == "invalid_request_error"
        r = await http.post(f"/v2/models/{MODEL}/infer", json={**KSERVE, "id": "x" * 5000})
        assert r.status_code == 413 and set(r.json()) == {"error"} and "4096 bytes" in r.json()["error"]
        payload = httpx.Request("POST", "/", json=big).content
        r = await http.post("/v1/completions", content=chunked(payload),
                            headers={"content-type": "application/json"})  # fmt: skip
        assert r.status_code == 413 and "4096 bytes" in r.json()["error"]["message"]
        r = await http.post(f"/v2/models/{MODEL}/infer", content=chunked(payload))
        assert r.status_code == 413 and "4096 bytes" in r.json()["error"]
        assert (await http.post("/v1/completions", json=BODY)).status_code == 200

    serve(llm, ServerConfig(max_request_bytes=4096), body)


@pytest.mark.parametrize("origins", [[], ["https://app.example"]])
def test_cors_only_with_allowed_origins(llm: LLM, origins: list[str]) -> None:
    async def body(http: httpx.AsyncClient) -> None:
        preflight = {"origin": "https://app.example", "access-control-request-method": "POST"}
        r = await http.options("/v1/completions", headers=preflight)
        r2 = await http.post("/v1/completions", json=BODY, headers={"origin": "https://app.example"})
        other = await http.post("/v1/completions", json=BODY, headers={"origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        if origins:
            assert r.status_code == 200
            assert r.headers["access-control-allow-origin"] == "https://app.example"
            assert r2.headers["access-control-allow-origin"] == "https://app.example"
        else:
            assert r.status_code == 405 and "access-control-allow-origin" not in r.headers
            assert "access-control-allow-origin" not in r2.headers

    serve(llm, ServerConfig(allowed_origins=origins), body)
