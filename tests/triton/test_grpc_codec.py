"""The gRPC codec against tritonclient's own encoder (`InferInput`, `_get_inference_request`) and
decoder (`InferResult`): every datatype, BYTES and BOOL, typed `contents`, parameters, and the 400s."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc._utils import _get_inference_request

from gptserve.triton.grpc_codec import (
    CONTENTS_FIELD,
    decode_request,
    encode_response,
    stream_error,
    stream_response,
)
from gptserve.triton.types import InferResponse, OutputTensor, TritonError

NUMERIC = [
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
]


def sample(datatype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if datatype == "BOOL":
        return rng.integers(0, 2, shape).astype(bool)
    if datatype == "BYTES":
        words = [b"", b"a", "h\u00e9llo".encode(), bytes(range(256)), b"\x00\x01"]
        return np.array([words[i % len(words)] for i in range(int(np.prod(shape)))], dtype=object).reshape(
            shape
        )
    if datatype == "BF16":
        return rng.standard_normal(shape).astype(ml_dtypes.bfloat16)
    dtype = np.dtype(datatype.lower().replace("fp", "float"))
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    return rng.standard_normal(shape).astype(dtype)


def client_request(
    *inputs: tuple[str, str, np.ndarray], outputs=None, parameters=None, request_id=""
) -> pb.ModelInferRequest:
    wire = []
    for name, datatype, data in inputs:
        tensor = grpcclient.InferInput(name, list(data.shape), datatype)
        tensor.set_data_from_numpy(data)
        wire.append(tensor)
    requested = [grpcclient.InferRequestedOutput(n) for n in outputs] if outputs else None
    return _get_inference_request(
        model_name="m", inputs=wire, model_version="", request_id=request_id, outputs=requested,
        sequence_id=0, sequence_start=False, sequence_end=False, priority=0, timeout=None,
        parameters=parameters,
    )  # fmt: skip


def read_back(msg: pb.ModelInferResponse) -> grpcclient.InferResult:
    return grpcclient.InferResult(pb.ModelInferResponse.FromString(msg.SerializeToString()))


@pytest.mark.parametrize("datatype", NUMERIC + ["BYTES", "BF16"])
def test_every_datatype_round_trips_through_tritonclient(datatype):
    data = sample(datatype, (2, 3))
    msg = client_request(("x", datatype, data))
    request = decode_request(pb.ModelInferRequest.FromString(msg.SerializeToString()))
    got = request.inputs["x"]
    assert request.datatypes == {"x": datatype}
    assert got.shape == (2, 3)
    if datatype == "BF16":
        assert got.dtype == np.uint16
        np.testing.assert_array_equal(got, data.view(np.uint16))
    else:
        assert got.dtype == data.dtype
        np.testing.assert_array_equal(got, data)
    assert got.flags.writeable

    response = InferResponse("m", "1", outputs=[OutputTensor("y", datatype, got)])
    result = read_back(encode_response(response))
    out = result.as_numpy("y")
    assert out.shape == (2, 3)
    np.testing.assert_array_equal(out.view(np.uint16) if datatype == "BF16" else out, got)


def test_bytes_output_accepts_str_and_empty_tensors():
    text = np.array([["hello", "w\u00f6rld"]], dtype=object)
    out = read_back(encode_response(InferResponse("m", "1", outputs=[OutputTensor("t", "BYTES", text)])))
    assert out.as_numpy("t").tolist() == [[b"hello", "w\u00f6rld".encode()]]

    empty = np.empty((0,), dtype=object)
    request = decode_request(client_request(("e", "BYTES", empty)))
    assert request.inputs["e"].shape == (0,)
    out = read_back(encode_response(InferResponse("m", "1", outputs=[OutputTensor("e", "BYTES", empty)])))
    assert out.as_numpy("e").shape == (0,)


def test_requested_outputs_subset_keeps_raw_contents_aligned():
    tensors = [
        OutputTensor("output_ids", "UINT32", np.arange(6, dtype=np.uint32).reshape(1, 1, 6)),
        OutputTensor("sequence_length", "UINT32", np.array([[6]], dtype=np.uint32)),
        OutputTensor("cum_log_probs", "FP32", np.array([[-1.5]], dtype=np.float32)),
    ]
    response = InferResponse("m", "1", id="r1", outputs=tensors)
    msg = encode_response(response, ["cum_log_probs", "output_ids"])
    assert [o.name for o in msg.outputs] == ["output_ids", "cum_log_probs"]
    assert len(msg.raw_output_contents) == 2
    result = read_back(msg)
    assert result.as_numpy("sequence_length") is None
    np.testing.assert_array_equal(result.as_numpy("output_ids"), tensors[0].data)
    np.testing.assert_array_equal(result.as_numpy("cum_log_probs"), tensors[2].data)
    assert result.get_response().id == "r1"
    assert len(encode_response(response).outputs) == 3


def test_parameters_both_ways():
    msg = client_request(
        ("x", "INT32", np.zeros((1, 1), np.int32)),
        parameters={"s": "text", "b": True, "i": -7, "f": 0.25},
        request_id="abc",
        outputs=["y"],
    )
    msg.parameters["u"].uint64_param = 2**64 - 1
    request = decode_request(msg)
    assert request.id == "abc"
    assert request.outputs == ["y"]
    assert request.parameters == {"s": "text", "b": True, "i": -7, "f": 0.25, "u": 2**64 - 1}
    assert isinstance(request.parameters["b"], bool)

    response = InferResponse("m", "1", parameters={"b": False, "i": 3, "u": 2**64 - 1, "f": 1.5, "s": "x"})
    params = read_back(encode_response(response)).get_response(as_json=True)["parameters"]
    assert params["b"] == {"bool_param": False}
    assert params["i"] == {"int64_param": "3"}
    assert params["u"] == {"uint64_param": str(2**64 - 1)}
    assert params["f"] == {"double_param": 1.5}
    assert params["s"] == {"string_param": "x"}


def test_stream_messages_carry_final_flag_and_errors():
    response = InferResponse("m", "1", id="r", outputs=[OutputTensor("y", "INT32", np.ones((1,), np.int32))])
    msg = stream_response(response, final=False)
    assert msg.error_message == ""
    assert msg.infer_response.parameters["triton_final_response"].bool_param is False
    assert stream_response(response).infer_response.parameters["triton_final_response"].bool_param is True
    assert "triton_final_response" not in encode_response(response).parameters
    err = stream_error(
        "boom", decode_request(client_request(("x", "INT32", np.zeros(1, np.int32)), request_id="q"))
    )
    assert err.error_message == "boom" and err.infer_response.id == "q"


@pytest.mark.parametrize(
    "datatype", ["BOOL", "INT8", "INT32", "INT64", "UINT16", "UINT32", "UINT64", "FP32", "FP64", "BYTES"]
)
def test_typed_contents_are_decoded(datatype):
    data = sample(datatype, (2, 2), seed=1)
    msg = pb.ModelInferRequest(model_name="m")
    tensor = msg.inputs.add(name="x", datatype=datatype, shape=[2, 2])
    getattr(tensor.contents, CONTENTS_FIELD[datatype]).extend(data.ravel().tolist())
    got = decode_request(msg).inputs["x"]
    assert got.shape == (2, 2)
    np.testing.assert_array_equal(got, data)


def error_of(msg: pb.ModelInferRequest) -> str:
    with pytest.raises(TritonError) as info:
        decode_request(msg)
    assert info.value.status == 400
    return info.value.message


def test_malformed_requests_are_400_naming_the_input():
    good = client_request(("ids", "UINT32", np.arange(4, dtype=np.uint32).reshape(1, 4)))

    short = pb.ModelInferRequest()
    short.CopyFrom(good)
    short.raw_input_contents[0] = short.raw_input_contents[0][:-1]
    message = error_of(short)
    assert "'ids'" in message and "15" in message and "16" in message

    both = pb.ModelInferRequest()
    both.CopyFrom(good)
    both.inputs[0].contents.uint_contents.extend([1, 2, 3, 4])
    assert "contents field must not be specified" in error_of(both)

    missing_raw = pb.ModelInferRequest()
    missing_raw.CopyFrom(good)
    missing_raw.inputs.add(name="more", datatype="UINT32", shape=[1])
    assert "raw_input_contents" in error_of(missing_raw)

    bad_type = pb.ModelInferRequest()
    bad_type.CopyFrom(good)
    bad_type.inputs[0].datatype = "UINT128"
    assert "'UINT128'" in error_of(bad_type) and "'ids'" in error_of(bad_type)

    negative = pb.ModelInferRequest()
    negative.CopyFrom(good)
    negative.inputs[0].shape[1] = -4
    assert "'ids'" in error_of(negative)

    duplicate = client_request(("a", "INT32", np.zeros(1, np.int32)), ("a", "INT32", np.zeros(1, np.int32)))
    assert "'a'" in error_of(duplicate)

    shm = pb.ModelInferRequest(model_name="m")
    shm.inputs.add(name="s", datatype="FP32", shape=[1]).parameters["shared_memory_region"].string_param = "r"
    assert "shared memory" in error_of(shm) and "'s'" in error_of(shm)


def test_malformed_bytes_and_contents_are_400():
    msg = client_request(("t", "BYTES", np.array([b"abc", b"de"], dtype=object)))
    truncated = pb.ModelInferRequest()
    truncated.CopyFrom(msg)
    truncated.raw_input_contents[0] = msg.raw_input_contents[0][:-1]
    assert "'t'" in error_of(truncated)
    too_few = pb.ModelInferRequest()
    too_few.CopyFrom(msg)
    too_few.inputs[0].shape[0] = 3
    assert "'t'" in error_of(too_few) and "3" in error_of(too_few)

    fp16 = pb.ModelInferRequest(model_name="m")
    fp16.inputs.add(name="h", datatype="FP16", shape=[1])
    assert "raw_input_contents" in error_of(fp16) and "'h'" in error_of(fp16)

    count = pb.ModelInferRequest(model_name="m")
    count.inputs.add(name="c", datatype="INT32", shape=[3]).contents.int_contents.extend([1, 2])
    assert "'c'" in error_of(count)

    overflow = pb.ModelInferRequest(model_name="m")
    overflow.inputs.add(name="o", datatype="INT8", shape=[1]).contents.int_contents.extend([300])
    assert "'o'" in error_of(overflow)
