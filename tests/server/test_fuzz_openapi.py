"""Property-based fuzzing of the OpenAI routes with schemathesis, driven by the server's own OpenAPI
document (`/openapi.json`).

One real `gptserve serve` process over a tiny random GPT-J with the GPT-2 tokenizer, a 64-token context
(so that no generated request can ask for a long generation) and an API key. Schemathesis reads the
document from the running server and, for every operation in it, sends a bounded number of requests that
follow the schema and of requests that break it. Whatever it sends, the server never answers 5xx, every
4xx carries OpenAI's error body with a message, every stream ends with `data: [DONE]`, and the server is
still healthy and still generates afterwards. `GPTSERVE_FUZZ_EXAMPLES` (default 30) sets how many
examples the fuzzing phase tries per operation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import negative_data_rejection

from tests.server.conftest import ServerProcess, start_tiny_gptj_server

MODEL = "tiny"
MAX_LEN = 64
API_KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
MAX_EXAMPLES = int(os.environ.get("GPTSERVE_FUZZ_EXAMPLES", "30"))  # per operation; raise it for a deep run
OPENAI_PATHS = [
    "/v1/models",
    "/v1/models/{model_id}",
    "/v1/completions",
    "/v1/chat/completions",
    "/tokenize",
    "/detokenize",
    "/tokenizer_info",
]


@pytest.fixture(scope="module")
def fuzzed_server(tiny_gptj_tokenized, tmp_path_factory) -> Iterator[ServerProcess]:
    path = tmp_path_factory.mktemp("tiny-gptj-fuzz")
    proc = start_tiny_gptj_server(tiny_gptj_tokenized, path, MODEL, MAX_LEN, TEMPLATE, "--api-key", API_KEY)
    try:
        yield proc
    finally:
        assert proc.stop() == 0, "SIGTERM should drain and exit 0 after fuzzing"


@pytest.fixture(scope="module")
def api_schema(fuzzed_server: ServerProcess) -> Any:
    # The document itself needs no key, like /health; the requests under test carry it.
    schema = schemathesis.openapi.from_url(f"{fuzzed_server.url}/openapi.json", timeout=30)
    schema.config.update(headers=AUTH, request_timeout=60)
    schema.config.max_stream_events = 1 << 20  # read streams to the end (the context is 64 tokens)
    return schema


@schemathesis.check
def openai_error_body(ctx: Any, response: Any, case: Any) -> bool | None:
    """A 4xx carries `{"error": {"message": <non-empty string>, "type": ...}}`."""
    if not 400 <= response.status_code < 500:
        return None
    body = json.loads(response.content)
    error = body.get("error") if isinstance(body, dict) else None
    assert isinstance(error, dict), f"{response.status_code} without OpenAI's error object: {body!r}"
    assert isinstance(error.get("message"), str) and error["message"], f"error without a message: {body!r}"
    assert isinstance(error.get("type"), str), f"error without a type: {body!r}"
    return True


@schemathesis.check
def stream_ends_with_done(ctx: Any, response: Any, case: Any) -> bool | None:
    """A Server-Sent Events answer ends with `data: [DONE]`, and none of its events is a server error."""
    if not response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        return None
    events = [line for line in response.text.splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "data: [DONE]", f"stream does not end with [DONE]: {events[-3:]!r}"
    for event in events[:-1]:
        payload = json.loads(event.removeprefix("data: "))
        error = payload.get("error")
        assert not (error and error.get("type") == "server_error"), f"server error mid-stream: {event}"
    return True


CHECKS = [not_a_server_error, negative_data_rejection, openai_error_body, stream_ends_with_done]


def test_openapi_document_describes_the_openai_routes(fuzzed_server: ServerProcess) -> None:
    with httpx.Client(base_url=fuzzed_server.url, timeout=30) as http:
        doc = http.get("/openapi.json")
        assert doc.status_code == 200, "the document is served without the API key"
        assert http.get("/v1/models").status_code == 401, "the API itself still needs the key"
    paths = doc.json()["paths"]
    assert set(OPENAI_PATHS) <= set(paths)
    assert not [p for p in paths if p.startswith("/v2") or p == "/"], "Triton routes and the page stay out"

    def body(path: str) -> Any:
        return paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]

    assert body("/v1/completions") == {"$ref": "#/components/schemas/CompletionRequest"}
    assert body("/v1/chat/completions") == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    assert body("/tokenize") == {
        "oneOf": [
            {"$ref": "#/components/schemas/TokenizeCompletionRequest"},
            {"$ref": "#/components/schemas/TokenizeChatRequest"},
        ]
    }
    schemas = doc.json()["components"]["schemas"]
    assert schemas["CompletionRequest"]["additionalProperties"] is False
    assert "max_tokens" in schemas["CompletionRequest"]["properties"]
    retrieve = paths["/v1/models/{model_id}"]["get"]
    assert [p["name"] for p in retrieve["parameters"]] == ["model_id"]
    not_found = retrieve["responses"]["404"]["content"]["application/json"]["schema"]
    assert not_found["$ref"].endswith("/ErrorResponse"), "an unknown model is a 404 in OpenAI's form"
    responses = paths["/v1/completions"]["post"]["responses"]
    assert "422" not in responses, "bad requests are 400 with OpenAI's body, not FastAPI's 422"
    assert responses["4XX"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")


@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda m: m.value)
def test_fuzzed_requests_never_break_the_server(api_schema: Any, mode: GenerationMode) -> None:
    """Requests that follow the schema (positive) and requests that break it (negative), for every
    OpenAI operation. Driven through Hypothesis directly rather than schemathesis's pytest plugin, whose
    parametrization depends on pytest internals."""
    operations = [result.ok() for result in api_schema.include(path=OPENAI_PATHS).get_all_operations()]
    assert {op.path for op in operations} == set(OPENAI_PATHS)
    sent: dict[str, int] = {}
    for operation in operations:
        if mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET":
            continue  # nothing to break: the GET routes take no body and no parameter but a model name

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def fuzz(case: Any) -> None:
            case.call_and_validate(checks=CHECKS)
            sent[case.operation.path] = sent.get(case.operation.path, 0) + 1

        fuzz()
    fuzzed = [op.path for op in operations if mode is GenerationMode.POSITIVE or op.method.upper() != "GET"]
    assert all(sent.get(path, 0) > 0 for path in fuzzed), sent  # every operation was exercised


# Each of these was a 500. The fuzzer found the first kind (`echo` decoded token ids beyond the
# vocabulary); the others came up while chasing it: Hypothesis never writes lone surrogates (`"\ud800"`
# is valid JSON but no Unicode character, and the tokenizer raises on it), so they are spelt out here.
FOUND = [
    (
        "/v1/completions",
        {"prompt": [-1], "echo": True, "max_tokens": 1},
        "token id -1 outside the vocabulary",
    ),
    ("/v1/completions", {"prompt": [2**64], "echo": True, "max_tokens": 1}, "outside the vocabulary"),
    ("/v1/completions", '{"prompt": "a\\ud800b"}', "unpaired UTF-16 surrogate \\ud800"),
    ("/v1/completions", '{"prompt": "a", "model": "\\udc00"}', "unpaired UTF-16 surrogate \\udc00"),
    ("/v1/completions", '{"prompt": "a", "\\udfff": 1}', "unpaired UTF-16 surrogate \\udfff"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud83d"}]}', "surrogate"),
    ("/tokenize", '{"prompt": "\\udbff", "return_token_strs": true}', "surrogate"),
    ("/v1/completions", b'{"prompt": "a\xed\xa0\x80"}', "surrogate"),  # the same, as CESU-8 bytes
    ("/v1/completions", b'{"prompt": "a\xff"}', "not UTF-8"),
]


@pytest.mark.parametrize(("path", "body", "message"), FOUND)
def test_inputs_found_by_fuzzing_are_400(
    fuzzed_server: ServerProcess, path: str, body: Any, message: str
) -> None:
    content = json.dumps(body) if isinstance(body, dict) else body
    headers = {**AUTH, "Content-Type": "application/json"}
    r = httpx.post(fuzzed_server.url + path, content=content, headers=headers, timeout=30)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"]


def test_still_healthy_and_serving_after_fuzzing(fuzzed_server: ServerProcess) -> None:
    assert fuzzed_server.process.poll() is None, "the server process died under fuzzing"
    with httpx.Client(base_url=fuzzed_server.url, timeout=60, headers=AUTH) as http:
        assert http.get("/health").status_code == 200
        assert http.get("/v2/health/ready").status_code == 200
        body = {"prompt": [464, 2068], "max_tokens": 4, "temperature": 0}
        done = http.post("/v1/completions", json=body)
    assert done.status_code == 200, done.text
    assert done.json()["usage"]["completion_tokens"] == 4
