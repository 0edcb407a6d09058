"""The Triton HTTP protocol of a real `gptserve serve` process, driven by stock `tritonclient.http`: health,
metadata, config, infer in the FasterTransformer token form (binary and JSON), generate and
generate_stream, the text form's `stop_words` and `bad_words`, statistics, the repository index, error
paths in Triton's form, the API key, and a client that goes away (its engine request is aborted)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from functools import partial

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.server.conftest import ServerProcess, start_server

API_KEY = "triton-http-key"


def auth() -> dict[str, str]:
    """A fresh headers dict per call: tritonclient writes its own headers into the dict it is given."""
    return {"Authorization": f"Bearer {API_KEY}"}


MODEL = "tiny"
PROMPT = [464, 2068, 7586, 21831]
MAX_LEN = 4096


@pytest.fixture(scope="module")
def server(tiny_gptj_tokenized) -> Iterator[ServerProcess]:
    path = tiny_gptj_tokenized
    proc = start_server(
        str(path), "--served-model-name", MODEL, "--max-model-len", str(MAX_LEN), "--api-key", API_KEY
    )
    try:
        if httpx.get(f"{proc.url}/v2/health/live", timeout=5).status_code != 200:
            pytest.skip("the server does not mount the Triton HTTP routes yet")
        yield proc
    finally:
        assert proc.stop() == 0


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[httpclient.InferenceServerClient]:
    with httpclient.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=300) as c:
        yield c


def token_inputs(output_len: int, binary: bool = True, prompt: list[int] = PROMPT) -> list:
    tensors = [
        ("input_ids", np.array([prompt], dtype=np.uint32)),
        ("input_lengths", np.array([[len(prompt)]], dtype=np.uint32)),
        ("request_output_len", np.array([[output_len]], dtype=np.uint32)),
        ("runtime_top_k", np.array([[1]], dtype=np.uint32)),
    ]
    out = []
    for name, data in tensors:
        tensor = httpclient.InferInput(name, list(data.shape), "UINT32")
        tensor.set_data_from_numpy(data, binary_data=binary)
        out.append(tensor)
    return out


def triton_error(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


def test_health_and_metadata(client: httpclient.InferenceServerClient):
    assert client.is_server_live() and client.is_server_ready()  # health needs no key
    assert client.is_model_ready(MODEL, headers=auth())
    assert client.is_model_ready(MODEL, "1", headers=auth())
    meta = client.get_server_metadata(headers=auth())
    assert meta["name"] == "gptserve"
    assert {"binary_tensor_data", "model_configuration", "statistics", "model_repository"} <= set(
        meta["extensions"]
    )
    model = client.get_model_metadata(MODEL, headers=auth())
    assert model["name"] == MODEL and "1" in model["versions"]
    inputs = {t["name"]: t for t in model["inputs"]}
    assert inputs["input_ids"]["datatype"] == "UINT32" and inputs["input_ids"]["shape"] == [-1, -1]
    assert inputs["text_input"]["datatype"] == "BYTES"
    outputs = {t["name"] for t in model["outputs"]}
    assert {"output_ids", "sequence_length", "text_output"} <= outputs
    config = client.get_model_config(MODEL, headers=auth())
    assert config["name"] == MODEL and config["max_batch_size"] > 0
    assert any(t["name"] == "input_ids" and t["data_type"] == "TYPE_UINT32" for t in config["input"])


def test_infer_token_form_binary_and_json(client: httpclient.InferenceServerClient):
    result = client.infer(MODEL, token_inputs(5), headers=auth(), request_id="b1")
    output_ids = result.as_numpy("output_ids")
    assert output_ids.shape == (1, 1, len(PROMPT) + 5)
    assert output_ids[0, 0, : len(PROMPT)].tolist() == PROMPT
    assert result.as_numpy("sequence_length").tolist() == [[len(PROMPT) + 5]]
    assert result.get_response()["id"] == "b1"

    outputs = [httpclient.InferRequestedOutput("output_ids", binary_data=False)]
    as_json = client.infer(MODEL, token_inputs(5, binary=False), outputs=outputs, headers=auth())
    assert as_json.get_output("output_ids")["data"] == output_ids.reshape(-1).tolist()  # greedy: same tokens
    assert as_json.as_numpy("sequence_length") is None  # only what was asked for

    compressed = client.infer(
        MODEL,
        token_inputs(5),
        headers=auth(),
        request_compression_algorithm="gzip",
        response_compression_algorithm="deflate",
    )
    np.testing.assert_array_equal(compressed.as_numpy("output_ids"), output_ids)


def test_infer_text_form(client: httpclient.InferenceServerClient):
    text = httpclient.InferInput("text_input", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"The quick brown"]], dtype=object))
    max_tokens = httpclient.InferInput("max_tokens", [1, 1], "INT32")
    max_tokens.set_data_from_numpy(np.array([[4]], dtype=np.int32))
    result = client.infer(MODEL, [text, max_tokens], headers=auth())
    out = result.as_numpy("text_output")
    assert out.dtype == object and out.reshape(-1)[0].startswith(b"The quick brown")


def _events(response: httpx.Response) -> list[dict]:
    return [json.loads(block[len("data: ") :]) for block in response.text.split("\n\n") if block.strip()]


def test_generate_and_generate_stream(server: ServerProcess):
    payload = {"text_input": "The quick brown", "max_tokens": 6, "runtime_top_k": 1}
    url = f"{server.url}/v2/models/{MODEL}"
    whole = httpx.post(f"{url}/generate", json=payload, headers=auth(), timeout=300)
    assert whole.status_code == 200 and whole.headers["content-type"].startswith("application/json")
    body = whole.json()
    assert body["model_name"] == MODEL and body["text_output"].startswith("The quick brown")

    stream = httpx.post(
        f"{url}/generate_stream", json={**payload, "stream": True}, headers=auth(), timeout=300
    )
    assert stream.status_code == 200
    assert stream.headers["content-type"].startswith("text/event-stream")
    events = _events(stream)
    assert len(events) > 1 and not any("error" in e for e in events)
    assert "The quick brown" + "".join(e["text_output"] for e in events) == body["text_output"]

    versioned = httpx.post(f"{url}/versions/1/generate", json=payload, headers=auth(), timeout=300)
    assert versioned.json()["text_output"] == body["text_output"]


def greedy_tokens(server: ServerProcess, prompt: str, n: int) -> list[str]:
    """The text of each of the first `n` greedy tokens after `prompt` (OpenAI completions' logprobs)."""
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "logprobs": 0}
    response = httpx.post(f"{server.url}/v1/completions", json=body, headers=auth(), timeout=300)
    return response.json()["choices"][0]["logprobs"]["tokens"]


def a_word(tokens: list[str]) -> int:
    """The index of a generated token, after the first, that is a whole word with its leading space."""
    return next(i for i, t in enumerate(tokens) if i > 0 and t.startswith(" ") and t[1:].isalpha())


def bytes_input(name: str, rows: list[list[str]]) -> httpclient.InferInput:
    tensor = httpclient.InferInput(name, [len(rows), len(rows[0])], "BYTES")
    tensor.set_data_from_numpy(np.array([[w.encode() for w in row] for row in rows], dtype=object))
    return tensor


def text_inputs(prompts: list[str], max_tokens: int) -> list[httpclient.InferInput]:
    """A batch of prompts in the text form, answered without the prompt."""
    exclude = httpclient.InferInput("exclude_input_in_output", [len(prompts), 1], "BOOL")
    exclude.set_data_from_numpy(np.array([[True]] * len(prompts)))
    lengths = httpclient.InferInput("max_tokens", [len(prompts), 1], "INT32")
    lengths.set_data_from_numpy(np.array([[max_tokens]] * len(prompts), dtype=np.int32))
    return [bytes_input("text_input", [[p] for p in prompts]), exclude, lengths]


def test_text_form_stop_and_bad_words(server: ServerProcess, client: httpclient.InferenceServerClient):
    prompts = ["The quick brown", "Once upon a time"]
    tokens = [greedy_tokens(server, p, 12) for p in prompts]
    texts = ["".join(t) for t in tokens]
    stops = [t[a_word(t)] for t in tokens]
    # Row 0 has one stop word ("" pads it), row 1 two, the first of which never comes.
    words = bytes_input("stop_words", [[stops[0], ""], ["\u2603", stops[1]]])
    result = client.infer(MODEL, [*text_inputs(prompts, 12), words], headers=auth())
    stopped = [row[0].decode() for row in result.as_numpy("text_output")]
    assert stopped == [text[: text.index(stop)] for text, stop in zip(texts, stops)]

    at = a_word(tokens[0])
    banned = bytes_input("bad_words", [[tokens[0][at]]])  # one list for every row
    result = client.infer(MODEL, [*text_inputs(prompts, 12), banned], headers=auth())
    first = result.as_numpy("text_output")[0, 0].decode()
    before = "".join(tokens[0][:at])
    assert first.startswith(before) and not first.startswith(before + tokens[0][at])


def test_generate_json_stop_and_bad_words(server: ServerProcess):
    prompt = "The quick brown"
    tokens = greedy_tokens(server, prompt, 12)
    text, at = "".join(tokens), a_word(tokens)
    url = f"{server.url}/v2/models/{MODEL}/generate"
    base = {"text_input": prompt, "max_tokens": 12, "runtime_top_k": 1, "exclude_input_in_output": True}

    def generate(**fields) -> httpx.Response:
        return httpx.post(url, json={**base, **fields}, headers=auth(), timeout=300)

    assert generate().json()["text_output"] == text
    expected = text[: text.index(tokens[at])]
    assert generate(stop_words=[tokens[at]]).json()["text_output"] == expected
    assert generate(stop_words=tokens[at]).json()["text_output"] == expected  # one string
    assert generate(parameters={"stop_words": [tokens[at]]}).json()["text_output"] == expected
    assert generate(stop=[tokens[at]]).json()["text_output"] == expected  # vLLM's and OpenAI's name

    unbanned = "".join(tokens[:at])
    for fields in ({"bad_words": [tokens[at]]}, {"parameters": {"bad_words": tokens[at]}}):
        out = generate(**fields).json()["text_output"]
        assert out.startswith(unbanned) and not out.startswith(unbanned + tokens[at])
    stream = httpx.post(
        f"{url}_stream",
        json={**base, "stream": True, "stop_words": [tokens[at]]},
        headers=auth(),
        timeout=300,
    )
    assert "".join(e["text_output"] for e in _events(stream)) == expected


def test_text_form_word_lists_are_checked(server: ServerProcess, client: httpclient.InferenceServerClient):
    url = f"{server.url}/v2/models/{MODEL}/generate"
    base = {"text_input": "hi", "max_tokens": 2}
    for fields, name in (
        ({"stop_words": [1, 2]}, "stop_words"),
        ({"bad_words": [["a"], 5]}, "bad_words"),
        ({"bad_words": {"a": 1}}, "bad_words"),
        ({"parameters": {"stop_words": 5}}, "stop_words"),
        ({"stop": [None, 1]}, "stop"),
        ({"stop_words": [str(i) for i in range(17)]}, "stop_words"),
        ({"text_input": None, "input_ids": [1, 2], "request_output_len": [2], "stop_words": ["a"]},
         "stop_words"),
    ):  # fmt: skip
        body = {**base, **fields}
        response = httpx.post(url, json={k: v for k, v in body.items() if v is not None}, headers=auth())
        assert response.status_code == 400 and name in response.json()["error"], (fields, response.text)

    numbers = httpclient.InferInput("stop_words", [1, 1], "INT32")
    numbers.set_data_from_numpy(np.array([[7]], dtype=np.int32))
    three_rows = bytes_input("bad_words", [["a"], ["b"], ["c"]])  # three lists for one prompt
    for tensor in (numbers, three_rows):
        err = triton_error(partial(client.infer, MODEL, [*text_inputs(["hi"], 2), tensor], headers=auth()))
        assert err.status() == "400" and tensor.name() in err.message()


def test_statistics_and_repository_index(client: httpclient.InferenceServerClient):
    client.infer(MODEL, token_inputs(2), headers=auth())
    stats = client.get_inference_statistics(MODEL, headers=auth())["model_stats"]
    entry = next(s for s in stats if s["name"] == MODEL)
    assert entry["inference_count"] >= 1 and entry["execution_count"] >= 1
    assert entry["inference_stats"]["success"]["count"] >= 1 and entry["last_inference"] > 0
    assert any(s["name"] == MODEL for s in client.get_inference_statistics(headers=auth())["model_stats"])
    index = client.get_model_repository_index(headers=auth())
    assert any(e["name"] == MODEL and e.get("state") == "READY" for e in index)


def test_errors_in_tritons_form_and_server_stays_ready(server: ServerProcess, client):
    err = triton_error(lambda: client.infer("nope", token_inputs(2), headers=auth()))
    assert err.status() == "404" and "nope" in err.message()
    assert triton_error(lambda: client.get_model_metadata("nope", headers=auth())).status() == "404"

    wrong_type = httpclient.InferInput("input_ids", [1, 1], "BYTES")
    wrong_type.set_data_from_numpy(np.array([[b"x"]], dtype=object))
    err = triton_error(lambda: client.infer(MODEL, [wrong_type], headers=auth()))
    assert err.status() == "400" and "input_ids" in err.message()

    wrong_shape = token_inputs(2)
    wrong_shape[1] = httpclient.InferInput("input_lengths", [1, 1, 1], "UINT32")
    wrong_shape[1].set_data_from_numpy(np.array([[[len(PROMPT)]]], dtype=np.uint32))
    err = triton_error(lambda: client.infer(MODEL, wrong_shape, headers=auth()))
    assert err.status() == "400" and "input_lengths" in err.message()

    missing = [t for t in token_inputs(2) if t.name() != "input_ids"]
    err = triton_error(lambda: client.infer(MODEL, missing, headers=auth()))
    assert err.status() == "400" and "input_ids" in err.message()

    err = triton_error(lambda: client.get_system_shared_memory_status(headers=auth()))
    assert err.status() == "501" and "not supported" in err.message()

    raw = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", content=b"{oops", headers=auth())
    assert raw.status_code == 400 and set(raw.json()) == {"error"}

    assert client.is_server_ready() and client.is_model_ready(MODEL, headers=auth())
    assert client.infer(MODEL, token_inputs(2), headers=auth()).as_numpy("output_ids").shape[-1] == 6


def test_api_key(server: ServerProcess, client: httpclient.InferenceServerClient):
    assert client.is_server_live() and client.is_server_ready()
    for call in (
        lambda: client.get_server_metadata(),
        lambda: client.get_model_metadata(MODEL),
        lambda: client.infer(MODEL, token_inputs(2)),
        lambda: client.get_model_repository_index(headers={"Authorization": "Bearer wrong"}),
    ):
        err = triton_error(call)
        assert err.status() == "401" and "API key" in err.message()
    assert not client.is_model_ready(MODEL)


def _aborted(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("vllm:request_success_total{") and 'finished_reason="abort"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _wait_aborted(url: str, before: float) -> None:
    deadline = time.monotonic() + 60
    while _aborted(url) <= before:
        assert time.monotonic() < deadline, "the engine request was never aborted"
        time.sleep(0.2)


LONG = {"text_input": "Once", "max_tokens": MAX_LEN - 16, "runtime_top_k": 1, "stream": True}


def test_client_disconnect_aborts_the_engine_request(server: ServerProcess):
    url = f"{server.url}/v2/models/{MODEL}"
    before = _aborted(server.url)
    with httpx.stream("POST", f"{url}/generate_stream", json=LONG, headers=auth(), timeout=300) as response:
        assert response.status_code == 200
        next(response.iter_lines())  # the first event arrived; now hang up
    _wait_aborted(server.url, before)

    before = _aborted(server.url)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/generate", json={**LONG, "stream": False}, headers=auth(), timeout=1.0)
    _wait_aborted(server.url, before)
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
