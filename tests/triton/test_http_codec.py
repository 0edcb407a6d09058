"""KServe v2 HTTP bodies: what `tritonclient.http` encodes decodes to the same arrays, and what we encode
`tritonclient.http.InferResult` reads back, for every datatype in JSON and binary; malformed bodies are
400s that name the tensor and the problem."""

from __future__ import annotations

import base64
import gzip
import json
import re
import struct
import zlib

import ml_dtypes
import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.http._utils import _get_inference_request

from gptserve.triton import http_codec as codec
from gptserve.triton.http_routes import config_json, stats_json
from gptserve.triton.types import InferResponse, OutputTensor, TensorSpec, TritonError

RNG = np.random.default_rng(0)


def sample(datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A tritonclient-ready array of `datatype` (BF16 as ml_dtypes.bfloat16)."""
    n = int(np.prod(shape))
    if datatype == "BYTES":
        items = [b"", "h\u00e9llo".encode(), b"\x00\x01\xff", b"abc" * 7] * n
        out = np.empty(n, dtype=object)
        out[:] = items[:n]
        return out.reshape(shape)
    if datatype == "BOOL":
        return RNG.integers(0, 2, n).astype(bool).reshape(shape)
    if datatype == "BF16":
        return RNG.standard_normal(n).astype(ml_dtypes.bfloat16).reshape(shape)
    dtype = np.dtype(datatype.lower().replace("fp", "float"))
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        lo, hi = max(int(info.min), -(2**62)), min(int(info.max), 2**62)
        return RNG.integers(lo, hi, n, endpoint=True).astype(dtype).reshape(shape)
    return RNG.standard_normal(n).astype(dtype).reshape(shape)


def as_words(a: np.ndarray) -> np.ndarray:
    """Comparable form: bfloat16 as its 16-bit words."""
    return a.view(np.uint16) if a.dtype == ml_dtypes.bfloat16 else a


def client_body(inputs, outputs=None, request_id="", **params):
    body, json_size = _get_inference_request(
        inputs=inputs,
        request_id=request_id,
        outputs=outputs,
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=0,
        timeout=None,
        custom_parameters=params or None,
    )
    return body, json_size


def client_input(name: str, data: np.ndarray, datatype: str, binary: bool) -> httpclient.InferInput:
    tensor = httpclient.InferInput(name, list(data.shape), datatype)
    tensor.set_data_from_numpy(data, binary_data=binary)
    return tensor


ALL_TYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
             "FP16", "FP32", "FP64", "BYTES", "BF16"]  # fmt: skip


# ------------------------------------------------------------------------------------------ requests
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", ALL_TYPES)
def test_request_round_trip_every_datatype(datatype: str, binary: bool):
    if datatype == "BF16" and not binary:
        pytest.skip("tritonclient sends BF16 only as binary data")
    data = sample(datatype, (2, 3))
    if datatype == "BYTES" and not binary:  # JSON carries only UTF-8 text
        data = np.array([[b"a", "b\u00e9".encode(), b""], [b"x", b"yy", b"z"]], dtype=object)
    other = sample("INT32", (1, 4))
    body, json_size = client_body(
        [client_input("x", data, datatype, binary), client_input("y", other, "INT32", binary)],
        request_id="req-1",
        answer=42,
    )
    request, fmt = codec.decode_infer_request(body, "m", "1", header_length=json_size)
    assert (request.model_name, request.model_version, request.id) == ("m", "1", "req-1")
    assert request.datatypes == {"x": datatype, "y": "INT32"}
    got = request.inputs["x"]
    assert got.shape == (2, 3)
    if datatype == "BYTES":
        assert got.dtype == object and got.tolist() == data.tolist()
    else:
        np.testing.assert_array_equal(got, as_words(data))
    np.testing.assert_array_equal(request.inputs["y"], other)
    assert request.parameters == {"answer": 42}
    # No outputs listed: tritonclient asks for every output in binary.
    assert request.outputs is None and fmt.binary_default is True


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_request(encoding: str):
    data = sample("FP32", (3,))
    body, json_size = client_body([client_input("x", data, "FP32", True)])
    packed = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    request, _ = codec.decode_infer_request(packed, "m", header_length=json_size, content_encoding=encoding)
    np.testing.assert_array_equal(request.inputs["x"], data)


def test_nested_and_flat_json_data():
    header = {
        "inputs": [
            {"name": "a", "shape": [2, 2], "datatype": "INT64", "data": [[1, 2], [3, 4]]},
            {"name": "b", "shape": [2, 2], "datatype": "INT64", "data": [1, 2, 3, 4]},
            {"name": "c", "shape": [1], "datatype": "BYTES", "data": ["text"]},
            {"name": "d", "shape": [0, 3], "datatype": "FP32", "data": []},
        ],
        "outputs": [{"name": "o1", "parameters": {"binary_data": True}}, {"name": "o2"}],
    }
    request, fmt = codec.decode_infer_request(json.dumps(header).encode(), "m")
    np.testing.assert_array_equal(request.inputs["a"], [[1, 2], [3, 4]])
    np.testing.assert_array_equal(request.inputs["b"], [[1, 2], [3, 4]])
    assert request.inputs["c"].tolist() == [b"text"]
    assert request.inputs["d"].shape == (0, 3)
    assert request.outputs == ["o1", "o2"]
    assert fmt.is_binary("o1") and not fmt.is_binary("o2")


def test_mixed_json_and_binary_inputs_keep_binary_order():
    first, second = sample("INT32", (2,)), sample("BYTES", (3,))
    inputs = [
        client_input("first", first, "INT32", True),
        client_input("json", np.array([7], dtype=np.int32), "INT32", False),
        client_input("second", second, "BYTES", True),
    ]
    body, json_size = client_body(inputs)
    request, _ = codec.decode_infer_request(body, "m", header_length=json_size)
    np.testing.assert_array_equal(request.inputs["first"], first)
    assert request.inputs["json"].tolist() == [7]
    assert request.inputs["second"].tolist() == second.tolist()


def test_raw_binary_request_takes_the_models_single_input():
    data = np.arange(6, dtype=np.float32)
    spec = [TensorSpec("x", "FP32", [-1, -1])]
    request, fmt = codec.decode_infer_request(data.tobytes(), "m", header_length="0", model_inputs=spec)
    np.testing.assert_array_equal(request.inputs["x"], data.reshape(1, 6))
    assert fmt.binary_default
    text = b"".join(struct.pack("<I", len(s)) + s for s in (b"ab", b"cde"))
    request, _ = codec.decode_infer_request(
        text, "m", header_length=0, model_inputs=[TensorSpec("t", "BYTES", [-1])]
    )
    assert request.inputs["t"].tolist() == [b"ab", b"cde"]
    with pytest.raises(TritonError, match="exactly one input"):
        codec.decode_infer_request(data.tobytes(), "m", header_length=0, model_inputs=spec * 2)


def _header(*inputs, **extra) -> dict:
    return {"inputs": list(inputs), **extra}


def _inp(name="x", datatype="INT32", shape=(2,), **kw) -> dict:
    return {"name": name, "datatype": datatype, "shape": list(shape), **kw}


BAD_JSON_REQUESTS = [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (json.dumps({"id": "x"}).encode(), "'inputs' list"),
    (json.dumps(_header(_inp(datatype="FLOAT"), data=[1, 2])).encode(), "input 'x': unsupported datatype"),
    (json.dumps(_header(_inp(data=[1, 2, 3]))).encode(), "input 'x': 'data' has 3 elements, but shape [2]"),
    (json.dumps(_header(_inp(data=[1, 2.5]))).encode(), "input 'x': INT32 data must be JSON integers"),
    (json.dumps(_header(_inp(data=[1, 2**40]))).encode(), "input 'x': a value is out of the range"),
    (json.dumps(_header(_inp(datatype="BOOL", data=[1, 0]))).encode(), "input 'x': BOOL data must be"),
    (json.dumps(_header(_inp(datatype="BYTES", data=[1, 2]))).encode(), "input 'x': BYTES data must be"),
    (json.dumps(_header(_inp(shape=(-1,), data=[1]))).encode(), "input 'x': 'shape' must be"),
    (json.dumps(_header(_inp())).encode(), "input 'x' has no 'data'"),
    (json.dumps(_header(_inp(data=[1, 2]), _inp(data=[1, 2]))).encode(), "input 'x' is given more than once"),
    (
        json.dumps(_header(_inp(parameters={"shared_memory_region": "r"}))).encode(),
        "input 'x' refers to a shared memory region",
    ),
    (
        json.dumps(
            _header(_inp(data=[1, 2]), outputs=[{"name": "o", "parameters": {"classification": 3}}])
        ).encode(),
        "output 'o' asks for classification",
    ),
    (
        json.dumps(_header(_inp(data=[1, 2]), outputs=[{"name": "o"}, {"name": "o"}])).encode(),
        "output 'o' is requested more than once",
    ),
]


@pytest.mark.parametrize(("body", "message"), BAD_JSON_REQUESTS)
def test_malformed_json_requests(body: bytes, message: str):
    with pytest.raises(TritonError, match=re.escape(message)) as info:
        codec.decode_infer_request(body, "m")
    assert info.value.status == 400


def test_binary_errors_name_the_input_and_the_problem():
    data = np.arange(4, dtype=np.int32)
    body, json_size = client_body([client_input("ids", data, "INT32", True)])

    with pytest.raises(TritonError, match="Inference-Header-Content-Length header"):
        codec.decode_infer_request(body, "m")  # binary tail but no header: not JSON
    head = body[:json_size]
    with pytest.raises(TritonError, match="input 'ids' has binary_data_size but the request has no"):
        codec.decode_infer_request(head, "m")
    with pytest.raises(TritonError, match="input 'ids': binary_data_size 16 exceeds the 12 bytes"):
        codec.decode_infer_request(body[:-4], "m", header_length=json_size)
    with pytest.raises(TritonError, match="4 bytes of binary data beyond"):
        codec.decode_infer_request(body + b"\0" * 4, "m", header_length=json_size)
    with pytest.raises(TritonError, match="is 9999, but the request body has"):
        codec.decode_infer_request(body, "m", header_length=9999)
    with pytest.raises(TritonError, match="must be an integer"):
        codec.decode_infer_request(body, "m", header_length="12a")

    # Sizes that disagree with the declared shape.
    header = json.loads(head)
    header["inputs"][0]["shape"] = [5]
    bad = json.dumps(header).encode()
    with pytest.raises(TritonError, match=r"input 'ids': binary data has 16 bytes, but 5 INT32 elements"):
        codec.decode_infer_request(bad + data.tobytes(), "m", header_length=len(bad))

    strings = sample("BYTES", (3,))
    body, json_size = client_body([client_input("text", strings, "BYTES", True)])
    header = json.loads(body[:json_size])
    header["inputs"][0]["shape"] = [4]
    bad = json.dumps(header).encode()
    with pytest.raises(TritonError, match="string elements 3 for input 'text', expecting 4"):
        codec.decode_infer_request(bad + body[json_size:], "m", header_length=len(bad))
    header["inputs"][0]["shape"] = [3]
    header["inputs"][0]["parameters"]["binary_data_size"] -= 1
    bad = json.dumps(header).encode()
    with pytest.raises(TritonError, match="input 'text'"):
        codec.decode_infer_request(bad + body[json_size:-1], "m", header_length=len(bad))


def test_bad_content_encoding():
    with pytest.raises(TritonError, match="not valid gzip"):
        codec.decode_infer_request(b"plain", "m", content_encoding="gzip")
    with pytest.raises(TritonError, match="unsupported Content-Encoding 'br'"):
        codec.decode_infer_request(b"{}", "m", content_encoding="br")


# ------------------------------------------------------------------------------------------ responses
def _client_view(data: np.ndarray, datatype: str) -> np.ndarray:
    """How our output arrays travel: BF16 as 16-bit words."""
    return data.view(np.uint16) if datatype == "BF16" else data


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", ALL_TYPES)
def test_response_read_by_tritonclient(datatype: str, binary: bool):
    data = sample(datatype, (2, 3))
    if datatype == "BYTES" and not binary:
        data = np.array([["a", "b\u00e9", ""], ["x", "yy", "z"]], dtype=object)
    response = InferResponse(
        "m",
        "3",
        id="r7",
        outputs=[
            OutputTensor("out", datatype, _client_view(data, datatype)),
            OutputTensor("extra", "INT32", np.array([[1, 2]], dtype=np.int32)),
        ],
    )
    fmt = codec.OutputFormat(binary_default=binary)
    body, headers = codec.encode_infer_response(response, fmt)
    header_length = headers.get(codec.HEADER_LENGTH)
    assert (header_length is not None) == binary
    result = httpclient.InferResult.from_response_body(
        body, header_length=int(header_length) if header_length else None
    )
    got = result.as_numpy("out")
    assert got.shape == (2, 3)
    if datatype == "BYTES":
        expected = [[v if isinstance(v, bytes) else v.encode() for v in row] for row in data.tolist()]
        got_list = [[v if isinstance(v, bytes) else v.encode() for v in row] for row in got.tolist()]
        assert got_list == expected
    elif datatype == "BF16":
        np.testing.assert_array_equal(got.astype(np.float32), data.astype(np.float32))
    else:
        np.testing.assert_array_equal(got, data)
    np.testing.assert_array_equal(result.as_numpy("extra"), [[1, 2]])
    top = result.get_response()
    assert (top["model_name"], top["model_version"], top["id"]) == ("m", "3", "r7")


def test_response_honours_requested_outputs_and_per_output_binary():
    response = InferResponse(
        "m",
        "1",
        outputs=[
            OutputTensor("a", "INT32", np.arange(3, dtype=np.int32)),
            OutputTensor("b", "FP32", np.ones(2, dtype=np.float32)),
            OutputTensor("c", "BYTES", np.array([b"hi"], dtype=object)),
        ],
    )
    fmt = codec.OutputFormat(names=["c", "a"], binary={"a": True, "c": False})
    body, headers = codec.encode_infer_response(response, fmt)
    result = httpclient.InferResult.from_response_body(body, header_length=int(headers[codec.HEADER_LENGTH]))
    assert [o["name"] for o in result.get_response()["outputs"]] == ["a", "c"]
    assert result.get_output("c")["data"] == ["hi"]
    assert "binary_data_size" in result.get_output("a")["parameters"]
    np.testing.assert_array_equal(result.as_numpy("a"), [0, 1, 2])
    assert result.as_numpy("b") is None

    body, headers = codec.encode_infer_response(response, codec.OutputFormat(names=["b"]))
    assert codec.HEADER_LENGTH not in headers and headers["Content-Type"] == "application/json"
    assert json.loads(body)["outputs"] == [
        {"name": "b", "datatype": "FP32", "shape": [2], "data": [1.0, 1.0]}
    ]


def test_compressed_response_read_by_tritonclient():
    response = InferResponse("m", "1", outputs=[OutputTensor("a", "INT64", np.arange(5))])
    body, headers = codec.encode_infer_response(response, codec.OutputFormat(binary_default=True))
    for accept, expected in (
        ("gzip", "gzip"),
        ("deflate", "deflate"),
        ("br, gzip;q=0.5", "gzip"),
        (None, None),
    ):
        packed, encoding = codec.compress(body, accept)
        assert encoding == expected
        result = httpclient.InferResult.from_response_body(
            packed, header_length=int(headers[codec.HEADER_LENGTH]), content_encoding=encoding
        )
        np.testing.assert_array_equal(result.as_numpy("a"), np.arange(5))


def test_json_output_of_non_utf8_bytes_asks_for_binary():
    response = InferResponse(
        "m", "1", outputs=[OutputTensor("t", "BYTES", np.array([b"\xff"], dtype=object))]
    )
    with pytest.raises(TritonError, match="output 't' holds bytes that are not UTF-8"):
        codec.encode_infer_response(response)


# ------------------------------------------------------------------------------------------ generate
FT_INPUTS = [
    TensorSpec("input_ids", "UINT32", [-1, -1]),
    TensorSpec("input_lengths", "UINT32", [-1, 1]),
    TensorSpec("request_output_len", "UINT32", [-1, -1]),
    TensorSpec("text_input", "BYTES", [-1, 1], optional=True),
    TensorSpec("stream", "BOOL", [-1, 1], optional=True),
    TensorSpec("temperature", "FP32", [-1, 1], optional=True),
]


def test_generate_request_maps_keys_to_inputs_and_parameters():
    body = json.dumps(
        {
            "id": "g1",
            "text_input": "Hello",
            "input_ids": [1, 2, 3],
            "request_output_len": 8,
            "stream": True,
            "temperature": 0,
            "max_tokens": 5,
            "parameters": {"seed": 3},
        }
    ).encode()
    request = codec.decode_generate_request(body, "m", "1", FT_INPUTS)
    assert request.id == "g1"
    assert request.inputs["text_input"].tolist() == [[b"Hello"]]
    assert request.inputs["input_ids"].dtype == np.uint32 and request.inputs["input_ids"].shape == (1, 3)
    assert request.inputs["request_output_len"].tolist() == [[8]]
    assert request.inputs["stream"].tolist() == [[True]]
    assert request.inputs["temperature"].dtype == np.float32
    assert request.datatypes["text_input"] == "BYTES"
    assert request.parameters == {"seed": 3, "max_tokens": 5}


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"input_ids": [[[1]]]}, "does not fit the model's shape"),
        ({"input_ids": [[1, 2], [3]]}, "rectangular"),
        ({"request_output_len": "8"}, "UINT32 data must be JSON integers"),
        ({"stream": 1}, "BOOL data must be"),
        ({"id": 5}, "'id' must be a string"),
    ],
)
def test_generate_request_errors(payload: dict, message: str):
    with pytest.raises(TritonError, match=message):
        codec.decode_generate_request(json.dumps(payload).encode(), "m", "1", FT_INPUTS)
    with pytest.raises(TritonError, match="not valid JSON"):
        codec.decode_generate_request(b"{", "m", "1", FT_INPUTS)


def test_generate_response_json():
    response = InferResponse(
        "m",
        "1",
        id="g",
        outputs=[
            OutputTensor("text_output", "BYTES", np.array([[b"Hi there"]], dtype=object)),
            OutputTensor("output_ids", "UINT32", np.array([[[1, 2, 3]]], dtype=np.uint32)),
            OutputTensor("sequence_length", "UINT32", np.array([[3]], dtype=np.uint32)),
        ],
    )
    assert codec.generate_response_json(response) == {
        "id": "g",
        "model_name": "m",
        "model_version": "1",
        "text_output": "Hi there",
        "output_ids": [1, 2, 3],
        "sequence_length": 3,
    }


# ------------------------------------------------------------------------------------------ JSON forms
def test_config_json_is_tritons_form():
    config = mc.ModelConfig(name="fastertransformer", backend="fastertransformer", max_batch_size=1024)
    config.input.add(name="input_ids", data_type=mc.TYPE_UINT32, dims=[-1])
    config.model_transaction_policy.decoupled = True
    config.parameters["tensor_para_size"].string_value = "1"
    obj = config_json(config)
    assert obj["name"] == "fastertransformer" and obj["max_batch_size"] == 1024
    assert obj["input"][0] == {
        **obj["input"][0],
        "name": "input_ids",
        "data_type": "TYPE_UINT32",
        "dims": [-1],
    }
    assert obj["model_transaction_policy"] == {"decoupled": True}
    assert obj["parameters"] == {"tensor_para_size": {"string_value": "1"}}
    assert obj["platform"] == ""  # defaults are written out, as Triton does
    json.dumps(obj)


def test_stats_json_shape():
    class M:
        name, version = "m", "1"

    from gptserve.triton.types import ModelStats

    m = M()
    m.stats = ModelStats(inference_count=3, execution_count=2)
    m.stats.success.add(1000)
    obj = stats_json(m)
    assert obj["inference_stats"]["success"] == {"count": 1, "ns": 1000}
    kinds = "success fail queue compute_input compute_infer compute_output cache_hit cache_miss"
    assert set(obj["inference_stats"]) == set(kinds.split())
    assert (obj["inference_count"], obj["execution_count"], obj["version"]) == (3, 2, "1")


def test_load_file_overrides_decode_base64():
    from gptserve.triton.http_routes import _override_files

    files = _override_files({"config": "{}", "file:1/model.bin": base64.b64encode(b"\x00\x01").decode()})
    assert files == {"file:1/model.bin": b"\x00\x01"}
    with pytest.raises(TritonError, match="not valid base64"):
        _override_files({"file:1/x": "***"})
