"""The Triton HTTP router in-process, over the served form of a tiny random GPT-J (GPT-2 vocabulary) on a
real engine: bodies encoded by tritonclient's own request encoder and read back by its `InferResult`,
every error in Triton's `{"error": ...}` body, the API key, and the extensions gptserve leaves out."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
from collections.abc import Awaitable, Callable

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.grpc import model_config_pb2 as mc

from gptserve import LLM
from gptserve.app import ServerConfig, build_app
from gptserve.frontend.async_engine import AsyncEngine
from gptserve.triton.http_codec import HEADER_LENGTH
from gptserve.triton.llm_model import LLMModel, served_config
from gptserve.triton.types import TritonError, TritonModel, not_found
from tests.triton.test_http_codec import client_body, client_input

PROMPT = [464, 3290, 318, 257]  # "The quick is a" in GPT-2 ids


class Registry:
    """The registry surface the router reads, over fixed models (the repository registry is tested
    through the server process)."""

    def __init__(self) -> None:
        self._models: dict[str, TritonModel] = {}
        self.ready = True
        self.calls: list[tuple] = []

    def add_llm(self, name: str, engine: AsyncEngine) -> LLMModel:
        """The served model, and a decoupled twin over the same engine."""
        decoupled = served_config(f"{name}_decoupled")
        decoupled.model_transaction_policy.decoupled = True
        self._models[name] = LLMModel.served(name, engine)
        self._models[f"{name}_decoupled"] = LLMModel(
            f"{name}_decoupled", "1", decoupled, engine, owns_engine=False
        )
        return self._models[name]

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def get(self, name: str, version: str = "") -> TritonModel:
        model = self._models.get(name)
        if model is None or (version and version != model.version):
            raise not_found(name, version)
        return model

    def models(self) -> list[TritonModel]:
        return list(self._models.values())

    def index(self, ready_only: bool = False) -> list[dict]:
        return [{"name": m.name, "version": m.version, "state": "READY", "reason": ""} for m in self.models()]

    async def load(self, name: str, config_json: str | None = None, files: dict | None = None) -> None:
        self.calls.append(("load", name, config_json, files))
        if name not in self._models:
            raise TritonError(f"failed to load '{name}', failed to poll from model repository")

    async def unload(self, name: str, unload_dependents: bool = False) -> None:
        self.calls.append(("unload", name, unload_dependents))


@pytest.fixture(scope="module")
def llm(tiny_gptj_tokenized) -> LLM:
    path = tiny_gptj_tokenized
    return LLM(str(path), dtype="fp32", device="cpu", max_model_len=128, num_kv_blocks=64, block_size=8)


Body = Callable[[httpx.AsyncClient], Awaitable[None]]


def serve(llm: LLM, body: Body, api_key: str | None = None, registry_ready: bool = True) -> Registry:
    registry: Registry | None = None

    async def main() -> None:
        nonlocal registry
        registry = Registry()
        registry.ready = registry_ready
        config = ServerConfig(api_key=api_key, served_model_names=["tiny"])
        app = build_app(llm.engine, config, registry)  # type: ignore[arg-type]
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as http:
                await body(http)

    asyncio.run(main())
    assert registry is not None
    return registry


def token_inputs(binary: bool, output_len: int = 4) -> list[httpclient.InferInput]:
    return [
        client_input("input_ids", np.array([PROMPT], dtype=np.uint32), "UINT32", binary),
        client_input("input_lengths", np.array([[len(PROMPT)]], dtype=np.uint32), "UINT32", binary),
        client_input("request_output_len", np.array([[output_len]], dtype=np.uint32), "UINT32", binary),
        client_input("runtime_top_k", np.array([[1]], dtype=np.uint32), "UINT32", binary),
    ]


def result_of(response: httpx.Response) -> httpclient.InferResult:
    assert response.status_code == 200, response.text
    length = response.headers.get(HEADER_LENGTH)
    return httpclient.InferResult.from_response_body(
        response.content, header_length=int(length) if length else None
    )


def assert_triton_error(response: httpx.Response, status: int, fragment: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    assert fragment in body["error"], body["error"]


def test_health_metadata_config(llm: LLM):
    async def body(http: httpx.AsyncClient) -> None:
        assert (await http.get("/v2/health/live")).status_code == 200
        assert (await http.get("/v2/health/ready")).status_code == 200
        meta = (await http.get("/v2")).json()
        assert meta["name"] == "gptserve" and "binary_tensor_data" in meta["extensions"]
        model = (await http.get("/v2/models/tiny")).json()
        assert model["name"] == "tiny" and model["versions"] == ["1"]
        inputs = {t["name"]: t for t in model["inputs"]}
        assert inputs["input_ids"] == {"name": "input_ids", "datatype": "UINT32", "shape": [-1, -1]}
        assert inputs["text_input"]["datatype"] == "BYTES"
        assert (await http.get("/v2/models/tiny/versions/1")).json() == model
        assert (await http.get("/v2/models/tiny/ready")).status_code == 200
        assert (await http.get("/v2/models/tiny/versions/1/ready")).status_code == 200
        config = (await http.get("/v2/models/tiny/config")).json()
        assert config["name"] == "tiny" and config["max_batch_size"] == 1024
        names = {t["name"]: t for t in config["input"]}
        assert names["input_ids"]["data_type"] == "TYPE_UINT32" and names["input_ids"]["dims"] == [-1]
        mc.ModelConfig(**{"name": config["name"]})  # the JSON uses the proto's field names
        decoupled = (await http.get("/v2/models/tiny_decoupled/config")).json()
        assert decoupled["model_transaction_policy"] == {"decoupled": True}

    serve(llm, body)


def test_infer_token_form_binary_json_and_compressed(llm: LLM):
    expected = llm.generate([PROMPT], _greedy(4))[0].outputs[0].token_ids

    async def body(http: httpx.AsyncClient) -> None:
        request, json_size = client_body(token_inputs(binary=True), request_id="r1")
        response = await http.post(
            "/v2/models/tiny/infer", content=request, headers={HEADER_LENGTH: str(json_size)}
        )
        result = result_of(response)
        assert result.get_response()["id"] == "r1"
        output_ids = result.as_numpy("output_ids")
        assert output_ids.shape == (1, 1, len(PROMPT) + 4)
        assert output_ids[0, 0].tolist() == PROMPT + list(expected)
        assert result.as_numpy("sequence_length").tolist() == [[len(PROMPT) + 4]]

        outputs = [httpclient.InferRequestedOutput("output_ids", binary_data=False)]
        request, json_size = client_body(token_inputs(binary=False), outputs=outputs)
        assert json_size is None
        response = await http.post("/v2/models/tiny/versions/1/infer", content=request)
        assert HEADER_LENGTH not in response.headers
        result = result_of(response)
        assert [o["name"] for o in result.get_response()["outputs"]] == ["output_ids"]
        assert result.as_numpy("output_ids")[0, 0].tolist() == PROMPT + list(expected)

        request, json_size = client_body(token_inputs(binary=True))
        response = await http.post(
            "/v2/models/tiny/infer",
            content=gzip.compress(request),
            headers={HEADER_LENGTH: str(json_size), "Content-Encoding": "gzip", "Accept-Encoding": "gzip"},
        )
        assert response.headers["content-encoding"] == "gzip"  # httpx has already undone it
        assert result_of(response).as_numpy("output_ids")[0, 0].tolist() == PROMPT + list(expected)

        stats = (await http.get("/v2/models/tiny/stats")).json()["model_stats"]
        assert stats[0]["name"] == "tiny" and stats[0]["inference_count"] >= 3
        assert stats[0]["inference_stats"]["success"]["count"] >= 3
        everything = (await http.get("/v2/models/stats")).json()["model_stats"]
        assert {s["name"] for s in everything} == {"tiny", "tiny_decoupled"}
        index = (await http.post("/v2/repository/index")).json()
        assert {"name": "tiny", "version": "1", "state": "READY", "reason": ""} in index

    serve(llm, body)


def _greedy(n: int):
    from gptserve import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def test_generate_and_generate_stream(llm: LLM):
    async def body(http: httpx.AsyncClient) -> None:
        payload = {"text_input": "The quick brown", "max_tokens": 6, "runtime_top_k": 1, "id": "g1"}
        response = await http.post("/v2/models/tiny/generate", json=payload)
        assert response.status_code == 200, response.text
        whole = response.json()
        assert (whole["id"], whole["model_name"], whole["model_version"]) == ("g1", "tiny", "1")
        assert whole["text_output"].startswith("The quick brown")

        response = await http.post("/v2/models/tiny/generate_stream", json={**payload, "stream": True})
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[len("data: ") :]) for line in response.text.split("\n\n") if line]
        assert len(events) > 1 and all("error" not in e for e in events)
        assert "The quick brown" + "".join(e["text_output"] for e in events) == whole["text_output"]

        # The token form through generate: keys naming inputs become tensors.
        tokens = {
            "input_ids": PROMPT,
            "input_lengths": len(PROMPT),
            "request_output_len": 3,
            "runtime_top_k": 1,
        }
        out = (await http.post("/v2/models/tiny/generate", json=tokens)).json()
        assert out["output_ids"][: len(PROMPT)] == PROMPT and out["sequence_length"] == len(PROMPT) + 3

        # A decoupled model streams without being asked to; errors after the 200 travel in the stream.
        response = await http.post("/v2/models/tiny_decoupled/generate_stream", json=payload)
        events = [json.loads(line[len("data: ") :]) for line in response.text.split("\n\n") if line]
        assert len(events) > 1

    serve(llm, body)


def test_errors_are_tritons_and_leave_the_server_ready(llm: LLM):
    async def body(http: httpx.AsyncClient) -> None:
        request, json_size = client_body(token_inputs(binary=True))
        headers = {HEADER_LENGTH: str(json_size)}
        assert_triton_error(
            await http.post("/v2/models/nope/infer", content=request, headers=headers), 404, "unknown model"
        )
        assert_triton_error(await http.get("/v2/models/nope"), 404, "'nope'")
        assert_triton_error(await http.get("/v2/models/tiny/versions/7/config"), 404, "version 7")
        assert_triton_error(await http.get("/v2/models/nope/ready"), 404, "'nope'")
        assert_triton_error(
            await http.post("/v2/models/tiny_decoupled/infer", content=request, headers=headers),
            400,
            "doesn't support models with decoupled transaction policy",
        )
        # Wrong datatype: text where the model wants token ids.
        text = np.array([[b"hello"]], dtype=object)
        bad, size = client_body([client_input("input_ids", text, "BYTES", True)])
        assert_triton_error(
            await http.post("/v2/models/tiny/infer", content=bad, headers={HEADER_LENGTH: str(size)}),
            400,
            "input_ids",
        )
        # A body whose sizes disagree, malformed JSON, a missing header before binary data.
        assert_triton_error(
            await http.post("/v2/models/tiny/infer", content=request[:-2], headers=headers), 400, "exceeds"
        )
        assert_triton_error(await http.post("/v2/models/tiny/infer", content=b"{"), 400, "not valid JSON")
        assert_triton_error(await http.post("/v2/models/tiny/infer", content=request), 400, HEADER_LENGTH)
        # Unknown input, unknown requested output.
        extra, size = client_body(
            [*token_inputs(True), client_input("bogus", np.zeros((1, 1), np.uint32), "UINT32", True)]
        )
        assert_triton_error(
            await http.post("/v2/models/tiny/infer", content=extra, headers={HEADER_LENGTH: str(size)}),
            400,
            "unexpected inference input 'bogus'",
        )
        wrong_out, size = client_body(token_inputs(True), outputs=[httpclient.InferRequestedOutput("nah")])
        assert_triton_error(
            await http.post("/v2/models/tiny/infer", content=wrong_out, headers={HEADER_LENGTH: str(size)}),
            400,
            "unexpected inference output 'nah'",
        )
        assert_triton_error(
            await http.post("/v2/models/tiny/generate", json={"text_input": 5}), 400, "text_input"
        )
        assert_triton_error(
            await http.post("/v2/models/tiny/generate_stream", json={"text_input": "x", "max_tokens": 0}),
            400,
            "max_tokens",
        )
        # Extensions gptserve leaves out, and routes that do not exist.
        assert_triton_error(await http.get("/v2/systemsharedmemory/status"), 501, "not supported")
        assert_triton_error(await http.post("/v2/cudasharedmemory/region/r/register"), 501, "not supported")
        assert_triton_error(await http.get("/v2/trace/setting"), 501, "not supported")
        assert_triton_error(await http.get("/v2/logging"), 501, "not supported")
        assert_triton_error(await http.get("/v2/no/such/route"), 404, "no route GET /v2/no/such/route")
        assert (await http.get("/v2/health/ready")).status_code == 200
        response = await http.post("/v2/models/tiny/infer", content=request, headers=headers)
        assert result_of(response).as_numpy("output_ids").shape == (1, 1, len(PROMPT) + 4)

    serve(llm, body)


def test_api_key_guards_all_but_health(llm: LLM):
    async def body(http: httpx.AsyncClient) -> None:
        assert (await http.get("/v2/health/live")).status_code == 200
        assert (await http.get("/v2/health/ready")).status_code == 200
        for method, path in [
            ("GET", "/v2"),
            ("GET", "/v2/models/tiny"),
            ("GET", "/v2/models/tiny/config"),
            ("POST", "/v2/models/tiny/infer"),
            ("POST", "/v2/models/tiny/generate"),
            ("POST", "/v2/repository/index"),
            ("GET", "/v2/models/stats"),
        ]:
            assert_triton_error(await http.request(method, path), 401, "API key")
        wrong = {"Authorization": "Bearer nope"}
        assert_triton_error(await http.get("/v2", headers=wrong), 401, "API key")
        good = {"Authorization": "Bearer sekret"}
        assert (await http.get("/v2", headers=good)).json()["name"] == "gptserve"

    serve(llm, body, api_key="sekret")


def test_shape_checked_against_the_model(llm: LLM):
    async def body(http: httpx.AsyncClient) -> None:
        inputs = token_inputs(binary=True)
        inputs[1] = client_input(
            "input_lengths", np.array([[[len(PROMPT)]]], dtype=np.uint32), "UINT32", True
        )
        request, size = client_body(inputs)
        response = await http.post(
            "/v2/models/tiny/infer", content=request, headers={HEADER_LENGTH: str(size)}
        )
        assert_triton_error(response, 400, "unexpected shape for input 'input_lengths' for model 'tiny'")
        response = await http.post("/v2/models/tiny/generate", json={"input_ids": [[[1]]]})
        assert_triton_error(response, 400, "input_ids")

    serve(llm, body)


def test_not_ready_registry_fails_readiness_only(llm: LLM):
    async def body(http: httpx.AsyncClient) -> None:
        assert (await http.get("/v2/health/live")).status_code == 200
        assert (await http.get("/v2/health/ready")).status_code == 503

    serve(llm, body, registry_ready=False)


def test_repository_load_and_unload_parameters(llm: LLM):
    config = json.dumps({"name": "tiny", "backend": "gptserve"})

    async def body(http: httpx.AsyncClient) -> None:
        params = {"config": config, "file:1/weights.bin": base64.b64encode(b"\x00\x01").decode()}
        response = await http.post("/v2/repository/models/tiny/load", json={"parameters": params})
        assert response.status_code == 200, response.text
        assert (await http.post("/v2/repository/models/tiny/load")).status_code == 200
        response = await http.post("/v2/repository/models/other/load", json={})
        assert_triton_error(response, 400, "failed to load 'other'")
        response = await http.post(
            "/v2/repository/models/tiny/load", json={"parameters": {"file:1/x": "AAAA"}}
        )
        assert_triton_error(response, 400, "need the 'config' parameter")
        body = {"parameters": {"unload_dependents": True}}
        assert (await http.post("/v2/repository/models/tiny/unload", json=body)).status_code == 200
        assert (await http.post("/v2/repository/models/tiny/unload")).status_code == 200

    registry = serve(llm, body)
    assert registry.calls == [
        ("load", "tiny", config, {"file:1/weights.bin": b"\x00\x01"}),
        ("load", "tiny", None, None),
        ("load", "other", None, None),
        ("unload", "tiny", True),
        ("unload", "tiny", False),
    ]


def test_over_the_model_registry(llm: LLM):
    async def main() -> None:
        app = build_app(llm.engine, ServerConfig(served_model_names=["tiny"]))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as http:
            assert (await http.get("/v2/health/ready")).status_code == 503  # not started yet
            async with app.router.lifespan_context(app):
                assert (await http.get("/v2/health/ready")).status_code == 200
                assert (await http.get("/v2/models/tiny")).json()["versions"] == ["1"]
                request, size = client_body(token_inputs(binary=True))
                response = await http.post(
                    "/v2/models/tiny/infer", content=request, headers={HEADER_LENGTH: str(size)}
                )
                assert result_of(response).as_numpy("output_ids").shape == (1, 1, len(PROMPT) + 4)
                index = (await http.post("/v2/repository/index", json={"ready": True})).json()
                assert index == [{"name": "tiny", "version": "1", "state": "READY", "reason": ""}]
                stats = (await http.get("/v2/models/tiny/versions/1/stats")).json()["model_stats"]
                assert stats[0]["inference_count"] == 1
                response = await http.post("/v2/repository/models/tiny/load")
                assert response.status_code == 503 and "explicit" in response.json()["error"]
                assert_triton_error(await http.get("/v2/models/tiny/versions/2"), 404, "version 2")

    asyncio.run(main())
