"""Structured request logs, in-process over a tiny random Llama: one `key=value` line per finished
request (OpenAI, KServe v2 and gRPC, streamed or not, refused or not) with its id, route, status,
token counts and timings, and none below INFO."""

from __future__ import annotations

import asyncio
import logging
import re

import httpx
import numpy as np
import pytest
import tritonclient.grpc.aio as grpcaio
from tritonclient.grpc import InferInput

from gptserve import LLM
from gptserve.app import ServerConfig, build_app
from tests.server.conftest import free_port

BODY = {"prompt": [5, 17, 42, 7], "max_tokens": 3, "temperature": 0}
LINE = re.compile(
    r'request_id=(?P<id>[\w.-]+) route="(?P<route>[^"]+)" status=(?P<status>\S+) '
    r"prompt_tokens=(?P<prompt>\d+) output_tokens=(?P<output>\d+) ttft_s=(?P<ttft>\S+) total_s=(?P<total>\S+)"
)


@pytest.fixture(scope="module")
def llm(tiny_models) -> LLM:
    path, _ = tiny_models["llama"]
    return LLM(str(path), dtype="fp32", device="cpu", max_model_len=128, num_kv_blocks=64, block_size=8)


def lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, str]]:
    found = [LINE.fullmatch(r.getMessage()) for r in caplog.records if r.name == "gptserve.requests"]
    assert all(found), [r.getMessage() for r in caplog.records if r.name == "gptserve.requests"]
    return [m.groupdict() for m in found if m]


def grpc_inputs() -> list[InferInput]:
    out = []
    for name, data in (("input_ids", np.array([[5, 17, 42, 7]], np.uint32)),
                       ("input_lengths", np.array([[4]], np.uint32)),
                       ("request_output_len", np.array([[3]], np.uint32))):  # fmt: skip
        tensor = InferInput(name, list(data.shape), "UINT32")
        tensor.set_data_from_numpy(data)
        out.append(tensor)
    return out


def test_one_line_per_request(llm: LLM, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gptserve.requests")
    port = free_port()

    async def main() -> None:
        app = build_app(llm.engine, ServerConfig(served_model_names=["tiny"], grpc_port=port))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as http:
                r = await http.post("/v1/completions", json=BODY, headers={"x-request-id": "abc-1\nforged"})
                assert r.status_code == 200 and r.headers["x-request-id"] == "abc-1forged"
                r = await http.post("/v1/completions", json={**BODY, "n": 2, "stream": True})
                assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
                assert (await http.post("/v1/completions", json={**BODY, "n": 0})).status_code == 400
                assert (await http.get("/health")).status_code == 200
                kserve = [
                    {"name": "input_ids", "datatype": "UINT32", "shape": [1, 4], "data": [5, 17, 42, 7]},
                    {"name": "input_lengths", "datatype": "UINT32", "shape": [1, 1], "data": [4]},
                    {"name": "request_output_len", "datatype": "UINT32", "shape": [1, 1], "data": [3]},
                ]
                assert (await http.post("/v2/models/tiny/infer", json={"inputs": kserve})).status_code == 200
            grpc = grpcaio.InferenceServerClient(f"127.0.0.1:{port}")
            await grpc.infer("tiny", grpc_inputs(), request_id="g-7")
            await grpc.close()

    asyncio.run(main())
    got = lines(caplog)
    assert [(g["route"], g["status"]) for g in got] == [
        ("POST /v1/completions", "200"),
        ("POST /v1/completions", "200"),
        ("POST /v1/completions", "400"),
        ("POST /v2/models/tiny/infer", "200"),
        ("gRPC ModelInfer", "OK"),
    ]
    plain, streamed, refused, kserve, grpc = got
    assert plain["id"] == "abc-1forged" and streamed["id"] != plain["id"]
    assert (plain["prompt"], plain["output"]) == ("4", "3")
    assert (streamed["prompt"], streamed["output"]) == ("4", "6")  # n=2 samples of 3 tokens
    assert (refused["prompt"], refused["output"], refused["ttft"]) == ("0", "0", "-")
    assert (kserve["prompt"], kserve["output"]) == ("4", "3")
    assert (grpc["id"], grpc["prompt"], grpc["output"]) == ("g-7", "4", "3")
    for g in (plain, streamed, kserve, grpc):
        assert 0 < float(g["ttft"]) <= float(g["total"])


def test_silent_below_info(llm: LLM, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gptserve.requests")

    async def main() -> None:
        app = build_app(llm.engine, ServerConfig())
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as http:
                assert (await http.post("/v1/completions", json=BODY)).status_code == 200

    asyncio.run(main())
    assert not [r for r in caplog.records if r.name == "gptserve.requests"]
