"""Wire <-> core for KServe v2 over HTTP: infer request bodies -> `InferRequest`, `InferResponse` -> bodies,
and the JSON of the generate extension.

An infer body is JSON, or (binary tensor data extension) a JSON header of `Inference-Header-Content-Length`
bytes followed by the raw tensors of the inputs that carry `parameters.binary_data_size`, in input order.
Raw tensors are little-endian and row-major; BOOL is one byte; BYTES are in the length-prefixed form of
`tensor_bytes`. A header length of 0 makes a "raw binary request": the whole body is the one input of
the model. Outputs go back in binary when the request asks for it per output (`binary_data`) or for all
(`binary_data_output`), which `tritonclient.http` does by default. Every malformed body raises
`TritonError` (400) naming the tensor and what is wrong with it; checks against a model's tensors
(shapes included) are `types.check_request`.
"""

from __future__ import annotations

import gzip
import json
import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gptserve.frontend.unicode_json import find_surrogate
from gptserve.triton.tensor_bytes import (
    count_bytes_elements,
    decode_raw_tensor,
    deserialize_bytes,
    serialize_bytes,
)
from gptserve.triton.types import (
    DATATYPES,
    InferRequest,
    InferResponse,
    TensorSpec,
    TritonError,
    refuse_shared_memory,
)

HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass
class OutputFormat:
    """How the response of one request is to be encoded: which outputs, and which of them in binary."""

    names: list[str] | None = None  # requested outputs in request order; None = all
    binary_default: bool = False  # request parameter `binary_data_output`
    binary: dict[str, bool] = field(default_factory=dict)  # per requested output `binary_data`

    def is_binary(self, name: str) -> bool:
        return self.binary.get(name, self.binary_default)


# ------------------------------------------------------------------------------------------ transport
def decompress(body: bytes, content_encoding: str | None) -> bytes:
    """Undo a request `Content-Encoding` (gzip or deflate, as `tritonclient` can send)."""
    encoding = (content_encoding or "identity").strip().lower()
    try:
        if encoding == "gzip":
            return gzip.decompress(body)
        if encoding == "deflate":
            try:
                return zlib.decompress(body)
            except zlib.error:
                return zlib.decompress(body, -zlib.MAX_WBITS)  # raw deflate without the zlib wrapper
    except (OSError, EOFError, zlib.error) as e:
        raise TritonError(f"request body is not valid {encoding} data: {e}") from None
    if encoding != "identity":
        raise TritonError(f"unsupported Content-Encoding '{content_encoding}': use gzip or deflate")
    return body


def compress(body: bytes, accept_encoding: str | None) -> tuple[bytes, str | None]:
    """Compress a response body as the client's `Accept-Encoding` allows; (body, Content-Encoding)."""
    accepted = {part.split(";")[0].strip().lower() for part in (accept_encoding or "").split(",")}
    if "gzip" in accepted:
        return gzip.compress(body), "gzip"
    if "deflate" in accepted:
        return zlib.compress(body), "deflate"
    return body, None


def _load_json(text: bytes, what: str, hint: str = "") -> Any:
    try:
        value = json.loads(text)
    except (UnicodeDecodeError, ValueError) as e:
        raise TritonError(f"{what} is not valid JSON: {e}{hint}") from None
    surrogate = find_surrogate(value)
    if surrogate is not None:  # valid JSON but not Unicode text: tokenizers and error bodies choke on it
        raise TritonError(
            f"{what} is not valid JSON: a string holds the unpaired UTF-16 surrogate "
            f"\\u{ord(surrogate):04x}, which is not a Unicode character"
        )
    return value


def parse_json_object(body: bytes, what: str = "request body") -> dict[str, Any]:
    """A JSON object body; an empty body is `{}`."""
    if not body.strip():
        return {}
    obj = _load_json(body, what)
    if not isinstance(obj, dict):
        raise TritonError(f"{what} must be a JSON object")
    return obj


# ------------------------------------------------------------------------------------------ tensors
def _element_count(shape: list[int]) -> int:
    return math.prod(shape)


def _check_shape(shape: Any, name: str) -> list[int]:
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise TritonError(f"input '{name}': 'shape' must be a list of non-negative integers, got {shape!r}")
    return shape


def _flatten(data: Any, out: list[Any]) -> None:
    if isinstance(data, list):
        for item in data:
            _flatten(item, out)
    else:
        out.append(data)


def _bf16_words(values: np.ndarray) -> np.ndarray:
    """float32 values -> bfloat16 bit patterns, rounded to nearest even."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits += 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).astype(np.uint16)


def _json_tensor(flat: list[Any], datatype: str, name: str) -> np.ndarray:
    """Flat JSON values -> a 1-D array of `datatype`, refusing values of the wrong JSON type."""
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in flat):
            raise TritonError(f"input '{name}': BYTES data must be JSON strings")
        out = np.empty(len(flat), dtype=object)
        out[:] = [v.encode("utf-8") for v in flat]
        return out
    if datatype == "BOOL":
        if not all(type(v) is bool for v in flat):
            raise TritonError(f"input '{name}': BOOL data must be JSON true/false")
        return np.array(flat, dtype=np.bool_)
    dtype = DATATYPES[datatype]
    if dtype.kind in "iu" and datatype != "BF16":
        if not all(type(v) is int for v in flat):
            raise TritonError(f"input '{name}': {datatype} data must be JSON integers")
        info = np.iinfo(dtype)
        if flat and (min(flat) < info.min or max(flat) > info.max):
            raise TritonError(f"input '{name}': a value is out of the range of {datatype}")
        return np.array(flat, dtype=dtype)
    if not all(type(v) in (int, float) for v in flat):
        raise TritonError(f"input '{name}': {datatype} data must be JSON numbers")
    if datatype == "BF16":
        return _bf16_words(np.array(flat, dtype=np.float32))
    return np.array(flat, dtype=dtype)


# ------------------------------------------------------------------------------------------ requests
def _parse_header_length(value: str | int | None, body_size: int) -> int | None:
    if value is None:
        return None
    try:
        length = int(value)
    except (TypeError, ValueError):
        raise TritonError(f"{HEADER_LENGTH} must be an integer, got '{value}'") from None
    if length < 0 or length > body_size:
        raise TritonError(f"{HEADER_LENGTH} is {length}, but the request body has {body_size} bytes")
    return length


def _raw_binary_request(
    body: bytes, model_name: str, model_version: str, inputs: list[TensorSpec] | None
) -> tuple[InferRequest, OutputFormat]:
    if inputs is None or len(inputs) != 1:
        count = "an unknown number of" if inputs is None else str(len(inputs))
        raise TritonError(
            f"a raw binary request ({HEADER_LENGTH}: 0) needs a model with exactly one input; "
            f"model '{model_name}' has {count} inputs"
        )
    spec = inputs[0]
    if spec.datatype == "BYTES":
        data = deserialize_bytes(body, count_bytes_elements(body, spec.name), spec.name)
    else:
        itemsize = DATATYPES[spec.datatype].itemsize
        if len(body) % itemsize:
            raise TritonError(
                f"input '{spec.name}': raw binary data of {len(body)} bytes is not a whole number of "
                f"{spec.datatype} elements"
            )
        data = decode_raw_tensor(body, spec.datatype, [len(body) // itemsize], spec.name)
    shape = _deduce_shape(spec, data.size)
    request = InferRequest(model_name=model_name, model_version=model_version)
    request.inputs[spec.name] = data.reshape(shape)
    request.datatypes[spec.name] = spec.datatype
    return request, OutputFormat(binary_default=True)


def _deduce_shape(spec: TensorSpec, count: int) -> list[int]:
    """The model's shape for `count` elements: a leading variable (batch) dimension is 1, one other
    variable dimension takes what is left."""
    shape = list(spec.shape)
    if len(shape) > 1 and shape[0] == -1:
        shape[0] = 1
    variable = [i for i, d in enumerate(shape) if d == -1]
    fixed = math.prod(d for d in shape if d != -1)
    if len(variable) > 1:
        raise TritonError(
            f"input '{spec.name}': a raw binary request cannot deduce a shape from {spec.shape}; "
            "send a JSON header"
        )
    if variable:
        if fixed == 0 or count % fixed:
            raise TritonError(f"input '{spec.name}': {count} elements do not fit shape {spec.shape}")
        shape[variable[0]] = count // fixed
    elif fixed != count:
        raise TritonError(f"input '{spec.name}': {count} elements do not fit shape {spec.shape}")
    return shape


def _output_format(header: dict[str, Any], parameters: dict[str, Any]) -> OutputFormat:
    outputs = header.get("outputs")
    fmt = OutputFormat(binary_default=bool(parameters.get("binary_data_output", False)))
    if outputs is None:
        return fmt
    if not isinstance(outputs, list):
        raise TritonError("'outputs' must be a list of objects")
    fmt.names = []
    for out in outputs:
        name = out.get("name") if isinstance(out, dict) else None
        if not isinstance(name, str):
            raise TritonError("every requested output needs a string 'name'")
        if name in fmt.names:
            raise TritonError(f"output '{name}' is requested more than once")
        params = out.get("parameters") or {}
        if not isinstance(params, dict):
            raise TritonError(f"output '{name}': 'parameters' must be an object")
        refuse_shared_memory(name, params, output=True)
        if params.get("classification"):
            raise TritonError(f"output '{name}' asks for classification, which is not supported")
        fmt.names.append(name)
        if "binary_data" in params:
            fmt.binary[name] = bool(params["binary_data"])
    return fmt


def decode_infer_request(
    body: bytes,
    model_name: str,
    model_version: str = "",
    header_length: str | int | None = None,
    content_encoding: str | None = None,
    model_inputs: list[TensorSpec] | None = None,
) -> tuple[InferRequest, OutputFormat]:
    """An infer body (after `Content-Encoding`) -> the request and how to encode its response.
    `header_length` is the `Inference-Header-Content-Length` header; `model_inputs` is needed only
    to read a raw binary request, whose datatype and shape come from the model's single input."""
    body = decompress(body, content_encoding)
    length = _parse_header_length(header_length, len(body))
    if length == 0:
        return _raw_binary_request(body, model_name, model_version, model_inputs)
    hint = "" if length is not None else f" (a body with binary tensor data needs the {HEADER_LENGTH} header)"
    header = _load_json(body[:length] if length is not None else body, "inference request header", hint)
    if not isinstance(header, dict):
        raise TritonError("inference request header must be a JSON object")
    binary = memoryview(body)[length:] if length is not None else memoryview(b"")

    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise TritonError("request 'parameters' must be an object")
    request_id = header.get("id", "")
    if not isinstance(request_id, str):
        raise TritonError("request 'id' must be a string")
    inputs = header.get("inputs")
    if not isinstance(inputs, list):
        raise TritonError("inference request must have an 'inputs' list")

    request = InferRequest(
        model_name=model_name,
        model_version=model_version,
        id=request_id,
        parameters={k: v for k, v in parameters.items() if k != "binary_data_output"},
    )
    offset = 0
    for tensor in inputs:
        name = tensor.get("name") if isinstance(tensor, dict) else None
        if not isinstance(name, str):
            raise TritonError("every input needs a string 'name'")
        if name in request.inputs:
            raise TritonError(f"input '{name}' is given more than once")
        datatype = tensor.get("datatype")
        if datatype not in DATATYPES:
            raise TritonError(f"input '{name}': unsupported datatype {datatype!r}")
        shape = _check_shape(tensor.get("shape"), name)
        params = tensor.get("parameters") or {}
        if not isinstance(params, dict):
            raise TritonError(f"input '{name}': 'parameters' must be an object")
        refuse_shared_memory(name, params)
        size = params.get("binary_data_size")
        if size is not None:
            if "data" in tensor:
                raise TritonError(f"input '{name}' has both 'data' and binary_data_size")
            if length is None:
                raise TritonError(
                    f"input '{name}' has binary_data_size but the request has no {HEADER_LENGTH} header"
                )
            if type(size) is not int or size < 0:
                raise TritonError(f"input '{name}': binary_data_size must be a non-negative integer")
            if offset + size > len(binary):
                raise TritonError(
                    f"input '{name}': binary_data_size {size} exceeds the {len(binary) - offset} bytes "
                    "of binary data left in the request body"
                )
            data = decode_raw_tensor(bytes(binary[offset : offset + size]), datatype, shape, name)
            offset += size
        elif "data" in tensor:
            flat: list[Any] = []
            _flatten(tensor["data"], flat)
            count = _element_count(shape)
            if len(flat) != count:
                raise TritonError(
                    f"input '{name}': 'data' has {len(flat)} elements, but shape {shape} needs {count}"
                )
            data = _json_tensor(flat, datatype, name).reshape(shape)
        else:
            raise TritonError(f"input '{name}' has no 'data' and no binary_data_size")
        request.inputs[name] = data
        request.datatypes[name] = datatype
    if offset != len(binary):
        raise TritonError(
            f"request body has {len(binary) - offset} bytes of binary data beyond what the inputs' "
            "binary_data_size claim"
        )
    fmt = _output_format(header, parameters)
    request.outputs = fmt.names
    return request, fmt


# ------------------------------------------------------------------------------------------ responses
def _bf16_to_float(words: np.ndarray) -> np.ndarray:
    return (np.ascontiguousarray(words, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def _typed(data: np.ndarray, datatype: str) -> np.ndarray:
    if datatype == "BF16" and data.dtype.itemsize == 2 and data.dtype != np.float16:
        return data.view(np.uint16)
    if datatype == "BF16" and data.dtype.kind == "f":
        return _bf16_words(data)
    return np.ascontiguousarray(data, dtype=DATATYPES[datatype])


def json_values(data: np.ndarray, datatype: str, name: str, errors: str = "strict") -> list[Any]:
    """A tensor as a flat list of JSON values (BYTES as UTF-8 strings, BF16 as floats)."""
    flat = np.asarray(data).reshape(-1)
    if datatype == "BYTES":
        out = []
        for item in flat:
            if isinstance(item, str):
                out.append(item)
                continue
            try:
                out.append(bytes(item).decode("utf-8", errors=errors))
            except UnicodeDecodeError:
                raise TritonError(
                    f"output '{name}' holds bytes that are not UTF-8; request it with binary_data"
                ) from None
        return out
    typed = _typed(flat, datatype)
    if datatype == "BF16":
        typed = _bf16_to_float(typed)
    return typed.tolist()


def encode_infer_response(
    response: InferResponse, fmt: OutputFormat | None = None
) -> tuple[bytes, dict[str, str]]:
    """An `InferResponse` -> (body, headers). Outputs are those requested (all when none were); the
    headers carry `Content-Type` and, when any output is binary, `Inference-Header-Content-Length`."""
    fmt = fmt or OutputFormat()
    tensors = response.outputs
    if fmt.names is not None:
        wanted = set(fmt.names)
        tensors = [t for t in tensors if t.name in wanted]
    header: dict[str, Any] = {"model_name": response.model_name, "model_version": str(response.model_version)}
    if response.id:
        header["id"] = response.id
    if response.parameters:
        header["parameters"] = response.parameters
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for tensor in tensors:
        data = np.asarray(tensor.data)
        out: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(data.shape)}
        if fmt.is_binary(tensor.name):
            raw = (
                serialize_bytes(data)
                if tensor.datatype == "BYTES"
                else _typed(data, tensor.datatype).tobytes()
            )
            out["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            out["data"] = json_values(data, tensor.datatype, tensor.name)
        outputs.append(out)
    header["outputs"] = outputs
    head = json.dumps(header, separators=(",", ":")).encode()
    if not chunks:
        return head, {"Content-Type": "application/json"}
    headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(head))}
    return b"".join([head, *chunks]), headers


# ------------------------------------------------------------------------------------------ generate
def _nested_shape(value: Any, name: str) -> list[int]:
    if not isinstance(value, list):
        return []
    if not value:
        return [0]
    inner = [_nested_shape(v, name) for v in value]
    if any(s != inner[0] for s in inner):
        raise TritonError(f"input '{name}': nested lists must be rectangular")
    return [len(value), *inner[0]]


def _generate_tensor(value: Any, spec: TensorSpec) -> np.ndarray:
    shape = _nested_shape(value, spec.name)
    if len(shape) > len(spec.shape):
        raise TritonError(
            f"input '{spec.name}': a value of shape {shape} does not fit the model's shape {spec.shape}"
        )
    shape = [1] * (len(spec.shape) - len(shape)) + shape
    flat: list[Any] = []
    _flatten(value, flat)
    return _json_tensor(flat, spec.datatype, spec.name).reshape(shape)


def decode_generate_request(
    body: bytes, model_name: str, model_version: str, inputs: list[TensorSpec]
) -> InferRequest:
    """A generate body -> `InferRequest`: top-level keys naming a model input become that tensor (in the
    input's datatype, shaped to its rank with leading 1s), `parameters` and the other keys become
    request parameters."""
    obj = parse_json_object(body, "generate request body")
    request_id = obj.pop("id", "")
    if not isinstance(request_id, str):
        raise TritonError("request 'id' must be a string")
    parameters = obj.pop("parameters", None) or {}
    if not isinstance(parameters, dict):
        raise TritonError("request 'parameters' must be an object")
    request = InferRequest(model_name=model_name, model_version=model_version, id=request_id)
    request.parameters.update(parameters)
    specs = {s.name: s for s in inputs}
    for key, value in obj.items():
        spec = specs.get(key)
        if spec is None:
            request.parameters[key] = value
            continue
        request.inputs[key] = _generate_tensor(value, spec)
        request.datatypes[key] = spec.datatype
    return request


def generate_response_json(response: InferResponse) -> dict[str, Any]:
    """`{id, model_name, model_version, <output>: value...}`: an output of one element is a JSON scalar,
    a larger one a flat list; BYTES are text."""
    out: dict[str, Any] = {
        "id": response.id,
        "model_name": response.model_name,
        "model_version": str(response.model_version),
    }
    for tensor in response.outputs:
        values = json_values(tensor.data, tensor.datatype, tensor.name, errors="replace")
        out[tensor.name] = values[0] if len(values) == 1 else values
    return out
