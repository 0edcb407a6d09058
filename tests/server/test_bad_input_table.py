"""The bad-input table: every malformed or out-of-range request, on every route and protocol, gets its 4xx
(gRPC: its status code) with an error body in the route's form whose message names the field or the
reason; afterwards the same server still answers good requests on every protocol.

One real `gptserve serve` process over a tiny random GPT-J with the GPT-2 vocabulary serves all cases,
driven by the stock clients: `openai`, `httpx`, `tritonclient.http` and `tritonclient.grpc`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from tests.server.conftest import ServerProcess, start_tiny_gptj_server

MODEL = "tiny"
MAX_LEN = 512
MAX_REQUEST_BYTES = 64 * 1024
TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
PROMPT = [464, 2068, 7586, 21831]
MESSAGES = [{"role": "user", "content": "hi"}]


@dataclass
class Servers:
    """The server under test and a client per protocol."""

    proc: ServerProcess
    grpc_url: str
    http: httpx.Client
    sdk: openai.OpenAI
    triton_http: httpclient.InferenceServerClient
    triton_grpc: grpcclient.InferenceServerClient


@pytest.fixture(scope="module")
def servers(tiny_gptj_tokenized, tmp_path_factory) -> Iterator[Servers]:
    path = tmp_path_factory.mktemp("tiny-gptj-bad-input")
    proc = start_tiny_gptj_server(
        tiny_gptj_tokenized, path, MODEL, MAX_LEN, TEMPLATE, "--max-request-bytes", str(MAX_REQUEST_BYTES)
    )
    grpc_url = proc.grpc_url
    try:
        with (
            httpx.Client(base_url=proc.url, timeout=60) as http,
            httpclient.InferenceServerClient(proc.url.removeprefix("http://"), network_timeout=60) as th,
        ):
            sdk = openai.OpenAI(base_url=f"{proc.url}/v1", api_key="unused", max_retries=0, timeout=60)
            tg = grpcclient.InferenceServerClient(grpc_url)
            yield Servers(proc, grpc_url, http, sdk, th, tg)
            tg.close()
    finally:
        assert proc.stop() == 0


# --------------------------------------------------------------------------------- one failed call
@dataclass
class Failure:
    """What a refused call answered: the status (an HTTP code, or a gRPC status name), the message, and
    the OpenAI `param` where the route has one."""

    status: int | str
    message: str
    param: str | None = None


def openai_failure(response: httpx.Response) -> Failure:
    """An OpenAI-route answer; its body must be exactly OpenAI's error shape."""
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and isinstance(error["type"], str)
    return Failure(response.status_code, error["message"], error["param"])


def triton_failure(response: httpx.Response) -> Failure:
    """A KServe v2 answer; its body must be exactly Triton's `{"error": "<message>"}`."""
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    return Failure(response.status_code, body["error"])


def sdk_failure(call: Callable[[], Any]) -> Failure:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    return openai_failure(info.value.response)


def tritonclient_failure(call: Callable[[], Any]) -> Failure:
    with pytest.raises(InferenceServerException) as info:
        call()
    status = info.value.status()
    return Failure(int(status) if str(status).isdigit() else str(status), info.value.message() or "")


# ------------------------------------------------------------------------------------------ inputs
def completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "hi", "max_tokens": 2, **fields}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, **fields}


def kserve_tensor(name: str, datatype: str, shape: list[int], data: Any) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


def token_inputs(output_len: int = 2, prompt: list[int] = PROMPT) -> list[dict[str, Any]]:
    return [
        kserve_tensor("input_ids", "UINT32", [1, len(prompt)], prompt),
        kserve_tensor("input_lengths", "UINT32", [1, 1], [len(prompt)]),
        kserve_tensor("request_output_len", "UINT32", [1, 1], [output_len]),
    ]


def http_inputs(arrays: dict[str, np.ndarray], datatype: str = "UINT32") -> list[httpclient.InferInput]:
    out = []
    for name, data in arrays.items():
        tensor = httpclient.InferInput(name, list(data.shape), datatype)
        tensor.set_data_from_numpy(data, binary_data=True)
        out.append(tensor)
    return out


def grpc_inputs(arrays: dict[str, np.ndarray]) -> list[grpcclient.InferInput]:
    out = []
    for name, data in arrays.items():
        names = {"object": "BYTES", "uint32": "UINT32", "float32": "FP32"}
        tensor = grpcclient.InferInput(name, list(data.shape), names[data.dtype.name])
        tensor.set_data_from_numpy(data)
        out.append(tensor)
    return out


def ft_arrays(output_len: int = 2, prompt: list[int] = PROMPT) -> dict[str, np.ndarray]:
    return {
        "input_ids": np.array([prompt], dtype=np.uint32),
        "input_lengths": np.array([[len(prompt)]], dtype=np.uint32),
        "request_output_len": np.array([[output_len]], dtype=np.uint32),
    }


def raw_grpc_infer(s: Servers, request: pb.ModelInferRequest) -> Failure:
    """A hand-built `ModelInferRequest` (shapes the client library would refuse to send)."""
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    with grpc.insecure_channel(s.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=60)
    return Failure(str(info.value.code()), info.value.details() or "")


def raw_token_request(input_ids_bytes: bytes, shape: list[int]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=MODEL)
    for name, dims in (("input_ids", shape), ("input_lengths", [1, 1]), ("request_output_len", [1, 1])):
        request.inputs.add(name=name, datatype="UINT32", shape=dims)
    request.raw_input_contents.extend(
        [input_ids_bytes, np.array([4], np.uint32).tobytes(), np.array([2], np.uint32).tobytes()]
    )
    return request


def binary_infer(
    s: Servers, header: dict[str, Any], tail: bytes, header_length: int | None = None
) -> Failure:
    """A KServe v2 binary-extension body: a JSON header, then raw tensor bytes."""
    head = json.dumps(header).encode()
    length = len(head) if header_length is None else header_length
    response = s.http.post(
        f"/v2/models/{MODEL}/infer",
        content=head + tail,
        headers={"Inference-Header-Content-Length": str(length), "Content-Type": "application/octet-stream"},
    )
    return triton_failure(response)


# ------------------------------------------------------------------------------------------- table
def post(path: str, body: Any = None, content: bytes | None = None) -> Callable[[Servers], Failure]:
    form = triton_failure if path.startswith("/v2") else openai_failure

    def call(s: Servers) -> Failure:
        if content is not None:
            return form(s.http.post(path, content=content, headers={"content-type": "application/json"}))
        return form(s.http.post(path, json=body))

    return call


INFER = f"/v2/models/{MODEL}/infer"
GENERATE = f"/v2/models/{MODEL}/generate"
GENERATE_STREAM = f"/v2/models/{MODEL}/generate_stream"
INVALID = "StatusCode.INVALID_ARGUMENT"

# (case id, call, expected status, text the message or the param must contain)
CASES: list[tuple[str, Callable[[Servers], Failure], int | str, str]] = [
    # ---- /v1/completions through the openai SDK
    ("sdk-temperature-negative", lambda s: sdk_failure(lambda: s.sdk.completions.create(
        model=MODEL, prompt="hi", max_tokens=2, temperature=-1)), 400, "temperature"),
    ("sdk-top-p-zero", lambda s: sdk_failure(lambda: s.sdk.completions.create(
        model=MODEL, prompt="hi", max_tokens=2, top_p=0)), 400, "top_p"),
    ("sdk-unknown-model", lambda s: sdk_failure(lambda: s.sdk.completions.create(
        model="nope", prompt="hi", max_tokens=2)), 404, "nope"),
    ("sdk-max-tokens-beyond-context", lambda s: sdk_failure(lambda: s.sdk.completions.create(
        model=MODEL, prompt="hi", max_tokens=10**6)), 400, "max_tokens"),
    # ---- /v1/completions as raw JSON
    ("cmpl-n-zero", post("/v1/completions", completion(n=0)), 400, "n"),
    ("cmpl-n-over-cap", post("/v1/completions", completion(n=1000)), 400, "n"),
    ("cmpl-max-tokens-zero", post("/v1/completions", completion(max_tokens=0)), 400, "max_tokens"),
    ("cmpl-max-tokens-string", post("/v1/completions", completion(max_tokens="ten")), 400, "max_tokens"),
    ("cmpl-too-many-stop-strings", post("/v1/completions", completion(stop=[f"s{i}" for i in range(17)])),
     400, "stop"),
    ("cmpl-empty-stop-string", post("/v1/completions", completion(stop=[""])), 400, "stop"),
    ("cmpl-logit-bias-key-not-id", post("/v1/completions", completion(logit_bias={"abc": 1})), 400,
     "logit_bias"),
    ("cmpl-logit-bias-value-range", post("/v1/completions", completion(logit_bias={"5": 500})), 400,
     "logit_bias"),
    ("cmpl-logit-bias-too-many", post("/v1/completions",
     completion(logit_bias={str(i): 1 for i in range(1025)})), 400, "logit_bias"),
    ("cmpl-logit-bias-outside-vocab", post("/v1/completions", completion(logit_bias={"999999": 1})), 400,
     "logit_bias"),
    ("cmpl-logprobs-over-cap", post("/v1/completions", completion(logprobs=50)), 400, "logprobs"),
    ("cmpl-prompt-missing", post("/v1/completions", {"model": MODEL, "max_tokens": 2}), 400, "prompt"),
    ("cmpl-prompt-empty-list", post("/v1/completions", completion(prompt=[])), 400, "prompt"),
    ("cmpl-prompt-empty-token-list", post("/v1/completions", completion(prompt=[[]])), 400, "prompt"),
    ("cmpl-prompt-token-outside-vocab", post("/v1/completions", completion(prompt=[5, 999999])), 400,
     "prompt"),
    ("cmpl-prompt-negative-token", post("/v1/completions", completion(prompt=[5, -1])), 400, "prompt"),
    ("cmpl-prompt-wrong-type", post("/v1/completions", completion(prompt={"text": "hi"})), 400, "prompt"),
    ("cmpl-unknown-field", post("/v1/completions", completion(temprature=0.5)), 400, "temprature"),
    ("cmpl-seed-negative", post("/v1/completions", completion(seed=-1)), 400, "seed"),
    ("cmpl-stream-not-bool", post("/v1/completions", completion(stream="yes")), 400, "stream"),
    ("cmpl-min-tokens-over-max", post("/v1/completions", completion(min_tokens=5)), 400, "min_tokens"),
    ("cmpl-stop-token-id-negative", post("/v1/completions", completion(stop_token_ids=[-1])), 400,
     "stop_token_ids"),
    ("cmpl-top-k-below-minus-one", post("/v1/completions", completion(top_k=-5)), 400, "top_k"),
    ("cmpl-best-of", post("/v1/completions", completion(best_of=3)), 400, "best_of"),
    ("cmpl-suffix", post("/v1/completions", completion(suffix="x")), 400, "suffix"),
    ("cmpl-temperature-nan", post("/v1/completions", content=b'{"prompt": "hi", "temperature": NaN}'), 400,
     "temperature"),
    ("cmpl-stop-not-strings", post("/v1/completions", completion(stop=[1, 2])), 400, "stop"),
    ("cmpl-prompt-mixed-list", post("/v1/completions", completion(prompt=["a", 5])), 400, "prompt"),
    ("cmpl-n-with-greedy-stream-huge-max", post("/v1/completions", completion(n=2, max_tokens=2**63)), 400,
     "max_tokens"),
    ("cmpl-body-not-json", post("/v1/completions", content=b"{not json"), 400, "json"),
    ("cmpl-body-not-object", post("/v1/completions", [1, 2]), 400, "object"),
    ("cmpl-body-too-large", post("/v1/completions", completion(prompt="x" * MAX_REQUEST_BYTES)), 413,
     "bytes"),
    ("cmpl-stream-options-without-stream", post("/v1/completions",
     completion(stream_options={"include_usage": True})), 400, "stream_options"),
    ("cmpl-parallel-tool-calls", post("/v1/completions", completion(parallel_tool_calls=True)), 400,
     "parallel_tool_calls"),
    # ---- /v1/chat/completions
    ("chat-messages-empty", post("/v1/chat/completions", chat(messages=[])), 400, "messages"),
    ("chat-messages-missing", post("/v1/chat/completions", {"model": MODEL}), 400, "messages"),
    ("chat-role-missing", post("/v1/chat/completions", chat(messages=[{"content": "hi"}])), 400, "role"),
    ("chat-content-wrong-type", post("/v1/chat/completions", chat(messages=[{"role": "user", "content": 5}])),
     400, "content"),
    ("chat-max-completion-tokens-negative", post("/v1/chat/completions",
     chat(max_tokens=None, max_completion_tokens=-3)), 400, "max_completion_tokens"),
    ("chat-top-logprobs-over-cap", post("/v1/chat/completions", chat(logprobs=True, top_logprobs=99)), 400,
     "top_logprobs"),
    ("chat-tool-without-function", post("/v1/chat/completions", chat(tools=[{"type": "function"}])), 400,
     "tools[0].function"),
    ("chat-response-format-unknown",
     post("/v1/chat/completions", chat(response_format={"type": "yaml"})), 400, "response_format.type"),
    ("chat-tool-choice-without-tools", post("/v1/chat/completions", chat(tool_choice="required")), 400,
     "tool_choice"),
    ("completion-guided-regex-invalid", post("/v1/completions", {"prompt": "hi", "guided_regex": "(("}), 400,
     "guided_regex"),
    ("chat-stream-options-wrong-type", post("/v1/chat/completions",
     chat(stream=True, stream_options={"include_usage": "yes"})), 400, "include_usage"),
    ("chat-content-part-unknown", post("/v1/chat/completions",
     chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])), 400,
     "content"),
    ("chat-role-unknown", post("/v1/chat/completions", chat(messages=[{"role": 7, "content": "hi"}])), 400,
     "role"),
    ("chat-role-not-openais", post("/v1/chat/completions",
     chat(messages=[*MESSAGES, {"role": "wizard", "content": "hi"}])), 400, "messages[1].role"),
    ("chat-metadata-not-strings", post("/v1/chat/completions", chat(metadata={"k": 1})), 400, "metadata"),
    ("chat-frequency-penalty-range", post("/v1/chat/completions", chat(frequency_penalty=-7)), 400,
     "frequency_penalty"),
    # ---- /tokenize, /detokenize, /v1/models
    ("tokenize-prompt-missing", post("/tokenize", {"model": MODEL}), 400, "prompt"),
    ("tokenize-prompt-not-string", post("/tokenize", {"prompt": 5}), 400, "prompt"),
    ("tokenize-unknown-model", post("/tokenize", {"model": "nope", "prompt": "hi"}), 404, "nope"),
    ("tokenize-body-not-json", post("/tokenize", content=b"[oops"), 400, "json"),
    ("detokenize-tokens-not-ints", post("/detokenize", {"tokens": ["a"]}), 400, "tokens"),
    ("detokenize-negative-token", post("/detokenize", {"tokens": [-1]}), 400, "tokens"),
    ("detokenize-token-outside-vocab", post("/detokenize", {"tokens": [10**9]}), 400, "tokens"),
    ("models-wrong-method", lambda s: openai_failure(s.http.post("/v1/models")), 405, "method"),
    ("models-retrieve-unknown", lambda s: openai_failure(s.http.get("/v1/models/nope")), 404, "nope"),
    ("openai-unknown-route", lambda s: openai_failure(s.http.get("/v1/nope")), 404, "/v1/nope"),
    # ---- KServe v2 infer, JSON
    ("infer-unknown-model", post("/v2/models/nope/infer", {"inputs": token_inputs()}), 404, "nope"),
    ("infer-inputs-missing", post(INFER, {"id": "x"}), 400, "inputs"),
    ("infer-input-bad-datatype", post(INFER, {"inputs": [kserve_tensor("input_ids", "INT33", [1, 1], [5])]}),
     400, "input_ids"),
    ("infer-data-does-not-fit-shape", post(INFER, {"inputs": [kserve_tensor("input_ids", "UINT32", [1, 5],
     PROMPT), *token_inputs()[1:]]}), 400, "input_ids"),
    ("infer-data-strings-for-ints", post(INFER, {"inputs": [kserve_tensor("input_ids", "UINT32", [1, 1],
     ["a"]), *token_inputs()[1:]]}), 400, "input_ids"),
    ("infer-output-len-zero", post(INFER, {"inputs": token_inputs(output_len=0)}), 400, "request_output_len"),
    ("infer-prompt-outside-vocab", post(INFER, {"inputs": token_inputs(prompt=[5, 999999])}), 400,
     "input_ids"),
    ("infer-text-max-tokens-negative", post(INFER, {"inputs": [kserve_tensor("text_input", "BYTES", [1, 1],
     ["hi"]), kserve_tensor("max_tokens", "INT32", [1, 1], [-1])]}), 400, "max_tokens"),
    ("infer-temperature-negative", post(INFER, {"inputs": [*token_inputs(), kserve_tensor(
     "temperature", "FP32", [1, 1], [-1.0])]}), 400, "temperature"),
    ("infer-unknown-input", post(INFER, {"inputs": [*token_inputs(), kserve_tensor("prompt_text", "BYTES",
     [1, 1], ["hi"])]}), 400, "prompt_text"),
    ("infer-output-len-huge", post(INFER, {"inputs": token_inputs(output_len=10**9)}), 400,
     "request_output_len"),
    ("infer-negative-shape", post(INFER, {"inputs": [kserve_tensor("input_ids", "UINT32", [1, -4], PROMPT),
     *token_inputs()[1:]]}), 400, "input_ids"),
    ("infer-text-input-not-strings", post(INFER, {"inputs": [kserve_tensor("text_input", "BYTES", [1, 1],
     [5])]}), 400, "text_input"),
    ("infer-batch-rows-disagree", post(INFER, {"inputs": [kserve_tensor("input_ids", "UINT32", [2, 4],
     PROMPT * 2), kserve_tensor("input_lengths", "UINT32", [3, 1], [4, 4, 4]), token_inputs()[2]]}), 400,
     "input_lengths"),
    ("infer-body-not-json", post(INFER, content=b"{oops"), 400, "json"),
    ("infer-body-too-large", post(INFER, {"inputs": token_inputs(prompt=[5] * (MAX_REQUEST_BYTES // 2))}),
     413, "bytes"),
    # ---- KServe v2 infer, binary tensor data
    ("binary-header-length-beyond-body", lambda s: binary_infer(s, {"inputs": []}, b"", header_length=10**6),
     400, "Inference-Header-Content-Length"),
    ("binary-size-beyond-body", lambda s: binary_infer(s, {"inputs": [{"name": "input_ids", "datatype":
     "UINT32", "shape": [1, 4], "parameters": {"binary_data_size": 16}}]}, b"\0" * 8), 400, "input_ids"),
    ("binary-size-not-matching-shape", lambda s: binary_infer(s, {"inputs": [{"name": "input_ids",
     "datatype": "UINT32", "shape": [1, 4], "parameters": {"binary_data_size": 12}}]}, b"\0" * 12), 400,
     "input_ids"),
    ("tritonclient-http-wrong-datatype", lambda s: tritonclient_failure(lambda: s.triton_http.infer(MODEL,
     http_inputs({"input_ids": np.array([[1.5, 2.5]], np.float32)}, "FP32") + http_inputs(
         {k: v for k, v in ft_arrays().items() if k != "input_ids"}))), 400, "input_ids"),
    ("tritonclient-http-unknown-version", lambda s: tritonclient_failure(lambda: s.triton_http.infer(
        MODEL, http_inputs(ft_arrays()), model_version="7")), 404, "7"),
    # ---- KServe v2 generate and generate_stream
    ("generate-max-tokens-string", post(GENERATE, {"text_input": "hi", "max_tokens": "ten"}), 400,
     "max_tokens"),
    ("generate-body-not-json", post(GENERATE, content=b"nope"), 400, "json"),
    ("generate-lone-surrogate", post(GENERATE, content=b'{"text_input": "a\\ud800", "max_tokens": 2}'), 400,
     "surrogate"),
    ("generate-text-input-number", post(GENERATE, {"text_input": 5, "max_tokens": 2}), 400, "text_input"),
    ("generate-stream-max-tokens-zero", post(GENERATE_STREAM, {"text_input": "hi", "max_tokens": 0}), 400,
     "max_tokens"),
    ("generate-unknown-model", post("/v2/models/nope/generate", {"text_input": "hi"}), 404, "nope"),
    ("generate-input-not-rectangular", post(GENERATE, {"input_ids": [[1, 2], [3]], "input_lengths": [2, 1],
     "request_output_len": [2, 2]}), 400, "input_ids"),
    ("generate-stream-temperature-negative", post(GENERATE_STREAM, {"text_input": "hi", "max_tokens": 2,
     "temperature": -1.0}), 400, "temperature"),
    # ---- gRPC through tritonclient.grpc and a raw stub
    ("grpc-unknown-model", lambda s: tritonclient_failure(lambda: s.triton_grpc.infer(
        "nope", grpc_inputs(ft_arrays()))), "StatusCode.NOT_FOUND", "nope"),
    ("grpc-input-ids-as-bytes", lambda s: tritonclient_failure(lambda: s.triton_grpc.infer(MODEL, grpc_inputs(
        {**ft_arrays(), "input_ids": np.array([[b"5 17"]], dtype=object)}))), INVALID, "input_ids"),
    ("grpc-output-len-zero", lambda s: tritonclient_failure(lambda: s.triton_grpc.infer(
        MODEL, grpc_inputs(ft_arrays(output_len=0)))), INVALID, "request_output_len"),
    ("grpc-missing-input-ids", lambda s: tritonclient_failure(lambda: s.triton_grpc.infer(MODEL, grpc_inputs(
        {k: v for k, v in ft_arrays().items() if k != "input_ids"}))), INVALID, "input_ids"),
    ("grpc-unknown-datatype", lambda s: raw_grpc_infer(s, pb.ModelInferRequest(model_name=MODEL, inputs=[
        pb.ModelInferRequest.InferInputTensor(name="input_ids", datatype="INT33", shape=[1, 1])])), INVALID,
     "input_ids"),
    ("grpc-temperature-negative", lambda s: tritonclient_failure(lambda: s.triton_grpc.infer(
        MODEL, grpc_inputs({**ft_arrays(), "temperature": np.array([[-1.0]], np.float32)}))), INVALID,
     "temperature"),
    ("grpc-raw-contents-short", lambda s: raw_grpc_infer(s, raw_token_request(b"\0" * 6, [1, 4])), INVALID,
     "input_ids"),
    ("grpc-raw-contents-count", lambda s: raw_grpc_infer(s, pb.ModelInferRequest(model_name=MODEL,
     raw_input_contents=[b"\0" * 4])), INVALID, "raw_input_contents"),
]  # fmt: skip


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 40
    assert len({case[0] for case in CASES}) == len(CASES), "case ids must be unique"


@pytest.mark.parametrize("call, status, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(servers: Servers, call: Callable[[Servers], Failure], status: int | str, needle: str):
    failure = call(servers)
    assert failure.status == status, failure
    assert needle.lower() in failure.message.lower() or failure.param == needle, failure


def test_server_still_answers_on_every_protocol(servers: Servers) -> None:
    s = servers
    assert s.http.get("/health").status_code == 200
    text = s.sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0)
    assert text.choices[0].finish_reason == "length" and text.usage.completion_tokens == 3
    reply = s.sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, temperature=0)
    assert reply.usage.completion_tokens == 2
    assert s.http.post("/tokenize", json={"prompt": "hi"}).json()["count"] >= 1
    assert s.http.post("/detokenize", json={"tokens": PROMPT}).status_code == 200
    out = s.triton_http.infer(MODEL, http_inputs(ft_arrays(3))).as_numpy("output_ids")
    assert out.shape[-1] == len(PROMPT) + 3
    assert s.http.post(GENERATE, json={"text_input": "hi", "max_tokens": 2}).status_code == 200
    lengths = s.triton_grpc.infer(MODEL, grpc_inputs(ft_arrays(3))).as_numpy("sequence_length")
    assert lengths[0, 0] == len(PROMPT) + 3
    metrics = s.http.get("/metrics").text
    assert 'vllm:num_requests_running{model_name="tiny"} 0.0' in metrics
