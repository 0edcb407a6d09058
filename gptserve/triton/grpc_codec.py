"""Wire <-> core for Triton's gRPC protocol: `ModelInferRequest` -> `InferRequest` and `InferResponse` ->
`ModelInferResponse`, with the checks Triton makes on the way in.

Tensor data travels either in `raw_input_contents` (one bytes entry per input, in input order; what
`tritonclient` always sends) or in the typed `contents` fields of each input, never both; raw BYTES
tensors are in the length-prefixed form of `tensor_bytes`. Responses always use
`raw_output_contents`, one entry per output in the order of `outputs`, which is how `tritonclient`
reads them. Every malformed request raises `TritonError` (400) naming the tensor at fault; checks
against a model's tensors are `types.check_request`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from gptserve.triton.tensor_bytes import decode_raw_tensor, serialize_bytes
from gptserve.triton.types import (
    DATATYPES,
    InferRequest,
    InferResponse,
    TritonError,
    refuse_shared_memory,
)

# Typed `InferTensorContents` field holding each datatype; FP16 and BF16 travel only as raw bytes.
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

_CONTENTS_FIELDS = tuple(sorted(set(CONTENTS_FIELD.values())))
INT64_MAX = 2**63 - 1


# ------------------------------------------------------------------------------------------ parameters
def parameter_value(param: pb.InferParameter | pb.ModelRepositoryParameter) -> Any:
    """The Python value of an `InferParameter` (or `ModelRepositoryParameter`) oneof; None if unset."""
    which = param.WhichOneof("parameter_choice")
    return None if which is None else getattr(param, which)


def decode_parameters(params: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    return {key: parameter_value(value) for key, value in params.items()}


def set_parameter(param: pb.InferParameter, value: Any) -> None:
    """Store `value` in the matching `InferParameter` oneof (bool, int64/uint64, double, string)."""
    if isinstance(value, (bool, np.bool_)):
        param.bool_param = bool(value)
    elif isinstance(value, (int, np.integer)):
        if int(value) > INT64_MAX:
            param.uint64_param = int(value)
        else:
            param.int64_param = int(value)
    elif isinstance(value, (float, np.floating)):
        param.double_param = float(value)
    elif isinstance(value, bytes):
        param.string_param = value.decode("utf-8", errors="replace")
    elif isinstance(value, str):
        param.string_param = value
    else:
        raise TypeError(f"parameter of type {type(value).__name__} has no InferParameter form")


def encode_parameters(target: Any, params: Mapping[str, Any]) -> None:
    """Fill a protobuf `map<string, InferParameter>` from a dict."""
    for key, value in params.items():
        set_parameter(target[key], value)


# ------------------------------------------------------------------------------------------- request
def _element_count(shape: Iterable[int], name: str) -> int:
    count = 1
    for d in shape:
        if d < 0:
            raise TritonError(f"invalid shape {list(shape)} for input '{name}': dimensions must be >= 0")
        count *= d
    return count


def _decode_contents(tensor: pb.ModelInferRequest.InferInputTensor, shape: list[int]) -> np.ndarray:
    name, datatype = tensor.name, tensor.datatype
    count = _element_count(shape, name)
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise TritonError(f"{datatype} data for input '{name}' must be sent in raw_input_contents")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise TritonError(
            f"unexpected number of elements {len(values)} in contents of input '{name}', expecting "
            f"{count} for shape {shape}"
        )
    if datatype == "BYTES":
        out = np.empty(count, dtype=object)
        out[:] = list(values)
        return out.reshape(shape)
    dtype = DATATYPES[datatype]
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if count and (min(values) < info.min or max(values) > info.max):
            raise TritonError(f"value out of range of {datatype} in contents of input '{name}'")
    return np.array(values, dtype=dtype).reshape(shape)


def _has_contents(tensor: pb.ModelInferRequest.InferInputTensor) -> bool:
    return tensor.HasField("contents") and any(len(getattr(tensor.contents, f)) for f in _CONTENTS_FIELDS)


def decode_request(msg: pb.ModelInferRequest) -> InferRequest:
    """`ModelInferRequest` -> `InferRequest` of numpy arrays; raises `TritonError` (400) naming the input."""
    for tensor in msg.inputs:
        refuse_shared_memory(tensor.name, tensor.parameters)
    use_raw = len(msg.raw_input_contents) > 0
    if use_raw and len(msg.raw_input_contents) != len(msg.inputs):
        raise TritonError(
            f"expected {len(msg.inputs)} raw_input_contents (one per input), "
            f"got {len(msg.raw_input_contents)}"
        )
    request = InferRequest(
        model_name=msg.model_name,
        model_version=msg.model_version,
        id=msg.id,
        parameters=decode_parameters(msg.parameters),
    )
    for i, tensor in enumerate(msg.inputs):
        name, datatype, shape = tensor.name, tensor.datatype, list(tensor.shape)
        if name in request.inputs:
            raise TritonError(f"input '{name}' is given more than once")
        if datatype not in DATATYPES:
            raise TritonError(f"unsupported datatype '{datatype}' for input '{name}'")
        if use_raw:
            if _has_contents(tensor):
                raise TritonError(
                    f"contents field must not be specified when using raw_input_contents for '{name}'"
                )
            request.inputs[name] = decode_raw_tensor(msg.raw_input_contents[i], datatype, shape, name)
        else:
            request.inputs[name] = _decode_contents(tensor, shape)
        request.datatypes[name] = datatype
    requested = [out.name for out in msg.outputs]
    if len(set(requested)) != len(requested):
        raise TritonError("an output is requested more than once")
    for out in msg.outputs:
        refuse_shared_memory(out.name, out.parameters, output=True)
    request.outputs = requested or None
    return request


# ------------------------------------------------------------------------------------------ response
def _raw_bytes(data: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return serialize_bytes(data)
    dtype = DATATYPES[datatype]
    arr = np.asarray(data)
    if datatype == "BF16" and arr.dtype != dtype and arr.dtype.itemsize == 2:
        arr = arr.view(np.uint16)  # ml_dtypes.bfloat16: same 16-bit words
    return np.ascontiguousarray(arr, dtype=dtype).tobytes()


def encode_response(
    response: InferResponse, requested: list[str] | None = None, final: bool | None = None
) -> pb.ModelInferResponse:
    """`InferResponse` -> `ModelInferResponse` with `raw_output_contents`. `requested` keeps only those
    outputs; `final` adds the `triton_final_response` parameter of streaming."""
    msg = pb.ModelInferResponse(
        model_name=response.model_name, model_version=str(response.model_version), id=response.id
    )
    encode_parameters(msg.parameters, response.parameters)
    if final is not None:
        msg.parameters["triton_final_response"].bool_param = final
    wanted = None if requested is None else set(requested)
    for tensor in response.outputs:
        if wanted is not None and tensor.name not in wanted:
            continue
        data = np.asarray(tensor.data)
        out = msg.outputs.add(name=tensor.name, datatype=tensor.datatype)
        out.shape.extend(int(d) for d in data.shape)
        msg.raw_output_contents.append(_raw_bytes(data, tensor.datatype))
    return msg


def stream_response(
    response: InferResponse, requested: list[str] | None = None, final: bool = True
) -> pb.ModelStreamInferResponse:
    return pb.ModelStreamInferResponse(infer_response=encode_response(response, requested, final))


def stream_error(message: str, request: InferRequest | None = None) -> pb.ModelStreamInferResponse:
    """A stream message carrying an error; the id (when known) lets the client match it to its request."""
    msg = pb.ModelStreamInferResponse(error_message=message)
    if request is not None:
        msg.infer_response.model_name = request.model_name
        msg.infer_response.model_version = request.model_version
        msg.infer_response.id = request.id
    return msg
