"""The protocol-neutral core of the Triton front-end: tensors, requests, responses, errors, models.

HTTP (KServe v2 JSON and binary) and gRPC (`inference.GRPCInferenceService`) both decode the wire into an
`InferRequest` of numpy arrays, hand it to a `TritonModel`, and encode the `InferResponse`s it returns.
Models never see the wire; front-ends never see the engine. BYTES tensors are numpy object arrays of
`bytes`; every other datatype is the numpy dtype in `DATATYPES`. `check_request` is the one validation of
a decoded request against a model's tensors, made by both front-ends; `refuse_shared_memory` is their
common refusal of shared-memory tensor parameters.
"""

from __future__ import annotations

import abc
import contextlib
import time
from collections.abc import AsyncIterator, Container
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

# KServe v2 datatype name -> numpy dtype (BYTES: object arrays of bytes; BF16 travels as raw uint16 words).
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
    "BF16": np.dtype(np.uint16),
}


def datatype_of_config(data_type: int) -> str:
    """`ModelConfig` `TYPE_*` enum value -> wire datatype (`TYPE_STRING` is `BYTES`)."""
    name = mc.DataType.Name(data_type).removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


def config_type_of_datatype(datatype: str) -> int:
    """Wire datatype -> `ModelConfig` `TYPE_*` enum value."""
    return mc.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}")


class TritonError(Exception):
    """An error answered in Triton's form: HTTP `{"error": message}` with `status`, gRPC with the matching
    status code (400 INVALID_ARGUMENT, 401 UNAUTHENTICATED, 404 NOT_FOUND, 409 ALREADY_EXISTS,
    499 CANCELLED, 501 UNIMPLEMENTED, 503 UNAVAILABLE, 500 INTERNAL)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


# Tensor parameters that place data in a shared memory region, which this server does not support.
SHARED_MEMORY_PARAMS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


def refuse_shared_memory(name: str, parameters: Container[str], output: bool = False) -> None:
    """Raises `TritonError` (400) when the parameters of input (or `output`) `name` ask for shared memory."""
    if not any(p in parameters for p in SHARED_MEMORY_PARAMS):
        return
    if output:
        raise TritonError(f"output '{name}' asks for shared memory, which is not supported")
    raise TritonError(
        f"input '{name}' refers to a shared memory region; shared memory is not supported, "
        "send the tensor data in the request"
    )


def not_found(model: str, version: str | int | None = None) -> TritonError:
    if version:
        return TritonError(f"Request for unknown model: '{model}' version {version} is not found", 404)
    return TritonError(f"Request for unknown model: '{model}' is not found", 404)


@dataclass
class TensorSpec:
    """One input or output of a model as clients see it. `shape` is the full wire shape, the batch
    dimension (-1) first when the model batches; -1 marks a variable dimension."""

    name: str
    datatype: str
    shape: list[int]
    optional: bool = False


@dataclass
class InferRequest:
    """One inference request, decoded from HTTP or gRPC."""

    model_name: str
    model_version: str = ""  # "" = the policy's latest ready version
    id: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    datatypes: dict[str, str] = field(default_factory=dict)  # input name -> datatype as sent
    outputs: list[str] | None = None  # requested output names; None = all
    arrival_ns: int = field(default_factory=time.monotonic_ns)


@dataclass
class OutputTensor:
    name: str
    datatype: str
    data: np.ndarray


@dataclass
class InferResponse:
    """One response; a decoupled (streaming) model sends several, the last with `final` set."""

    model_name: str
    model_version: str
    id: str = ""
    outputs: list[OutputTensor] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    final: bool = True

    def output(self, name: str) -> np.ndarray:
        for t in self.outputs:
            if t.name == name:
                return t.data
        raise KeyError(name)


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass
class ModelStats:
    """Triton's per-model statistics (`/v2/models/{m}/stats`, `ModelStatistics`)."""

    last_inference_ms: int = 0
    inference_count: int = 0  # batch rows served
    execution_count: int = 0  # executions (requests, for models that do not batch requests together)
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    pending: int = 0  # requests received and not yet answered

    def begin(self) -> int:
        """A request arrived: it is pending until `record`; returns its start time (`time.monotonic_ns`)."""
        self.pending += 1
        return time.monotonic_ns()

    def record(self, start_ns: int, rows: int, ok: bool) -> None:
        """Account one request that `begin` started at `start_ns` and that served `rows` rows."""
        self.pending -= 1
        elapsed = time.monotonic_ns() - start_ns
        if not ok:
            self.fail.add(elapsed)
            return
        self.success.add(elapsed)
        self.compute_infer.add(elapsed)
        self.inference_count += rows
        self.execution_count += 1
        self.last_inference_ms = time.time_ns() // 1_000_000

    def inference_durations(self) -> dict[str, Duration]:
        """The durations of Triton's `inference_stats`, by field name, in its order."""
        return {
            "success": self.success,
            "fail": self.fail,
            "queue": self.queue,
            "compute_input": self.compute_input,
            "compute_infer": self.compute_infer,
            "compute_output": self.compute_output,
        }


class TritonModel(abc.ABC):
    """A servable model version. Subclasses implement `infer` (and `stream` when decoupled)."""

    name: str
    version: str
    config: mc.ModelConfig
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def __init__(self) -> None:
        self.stats = ModelStats()

    @property
    def platform(self) -> str:
        return self.config.platform or self.config.backend

    @property
    def decoupled(self) -> bool:
        return self.config.model_transaction_policy.decoupled

    @property
    def ready(self) -> bool:
        return True

    @property
    def not_ready_reason(self) -> str:
        return "the model's engine stopped"

    @abc.abstractmethod
    async def infer(self, request: InferRequest) -> InferResponse:
        """Run one request to completion. Raises `TritonError` for bad input."""

    async def stream(self, request: InferRequest) -> AsyncIterator[InferResponse]:
        """Responses of one request as they come (decoupled models: several; others: one)."""
        yield await self.infer(request)

    def answers_once(self, request: InferRequest) -> bool:
        """Whether `request` gets exactly one response. A model whose config is not decoupled answers
        every request once, streamed or not, as Triton does; the infer routes serve only such requests."""
        return not self.decoupled

    async def responses(self, request: InferRequest) -> AsyncIterator[InferResponse]:
        """What a streaming route sends for `request`: every response when the model may answer several
        times, else its one final response."""
        if self.answers_once(request):
            yield await self.infer(request)
            return
        async with contextlib.aclosing(self.stream(request)) as responses:
            async for response in responses:
                yield response

    async def start(self) -> None:
        """Called on the event loop before serving (models over an engine start it here)."""
        return None

    async def stop(self) -> None:
        """Called at unload or shutdown."""
        return None


def tensor_specs(config: mc.ModelConfig) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """A config's inputs and outputs as clients see them: the batch dimension first when it batches."""
    batch = [-1] if config.max_batch_size > 0 else []
    inputs = [
        TensorSpec(t.name, datatype_of_config(t.data_type), batch + list(t.dims), t.optional)
        for t in config.input
    ]
    outputs = [
        TensorSpec(t.name, datatype_of_config(t.data_type), batch + list(t.dims)) for t in config.output
    ]
    return inputs, outputs


def _integer(datatype: str) -> bool:
    return datatype.startswith(("INT", "UINT"))


def check_request(model: TritonModel, request: InferRequest, *, shapes: bool = True) -> None:
    """Triton's checks of a request against a model's tensors, the one validation both front-ends make:
    input names, BYTES versus numeric data, batch size against `max_batch_size`, required inputs,
    requested outputs and, with `shapes`, each input's rank and fixed dimensions. An input whose request
    names its datatype must have the declared kind, as Triton requires: `request_output_len` sent as FP32
    where the config declares UINT32 is a 400 naming both. Integer widths and signedness are the one
    leniency (a value out of range is caught where it is read), so that FT's client scripts of either
    revision (INT32 or UINT64 seeds) work. Models check the requests they are handed with
    `shapes=False`: ensemble steps and direct callers pass tensors in the looser per-row forms the models'
    readers accept, with datatypes of their own."""
    specs = {s.name: s for s in model.inputs}
    for name, data in request.inputs.items():
        spec = specs.get(name)
        if spec is None:
            raise TritonError(f"unexpected inference input '{name}' for model '{model.name}'")
        sent = request.datatypes.get(name) or ("BYTES" if data.dtype == object else "")
        mismatched = (
            sent and shapes and sent != spec.datatype and not (_integer(sent) and _integer(spec.datatype))
        )
        if mismatched or (spec.datatype == "BYTES") != (data.dtype == object or sent == "BYTES"):
            raise TritonError(
                f"inference input '{name}' data-type is '{sent or data.dtype}', but model '{model.name}' "
                f"expects '{spec.datatype}'"
            )
        max_batch = model.config.max_batch_size
        if max_batch > 0 and data.ndim > 0 and data.shape[0] > max_batch:
            raise TritonError(
                f"inference request batch-size must be <= {max_batch} for '{model.name}', got {data.shape[0]}"
            )
    missing = [s.name for s in model.inputs if not s.optional and s.name not in request.inputs]
    if missing:
        required = sum(not s.optional for s in model.inputs)
        raise TritonError(
            f"expected {required} inputs but got {len(request.inputs)} inputs "
            f"for model '{model.name}'. Got input(s) {sorted(request.inputs)}, but missing required input(s) "
            f"{missing}. Please provide all required input(s)."
        )
    known = {s.name for s in model.outputs}
    for name in request.outputs or []:
        if name not in known:
            raise TritonError(f"unexpected inference output '{name}' for model '{model.name}'")
    if shapes:
        for name, data in request.inputs.items():
            wanted, shape = specs[name].shape, list(data.shape)
            if len(shape) != len(wanted) or any(w not in (-1, g) for w, g in zip(wanted, shape)):
                raise TritonError(
                    f"unexpected shape for input '{name}' for model '{model.name}'. "
                    f"Expected {wanted}, got {shape}"
                )


def make_response(
    model: TritonModel, request: InferRequest, tensors: dict[str, np.ndarray], final: bool = True
) -> InferResponse:
    """A response holding those of `tensors` the model declares and the request asked for (all when it
    named none), each cast to its configured datatype."""
    types = {s.name: s.datatype for s in model.outputs}
    outputs = [
        OutputTensor(name, types[name], np.asarray(data).astype(DATATYPES[types[name]], copy=False))
        for name, data in tensors.items()
        if name in types and (request.outputs is None or name in request.outputs)
    ]
    return InferResponse(model.name, model.version, request.id, outputs, final=final)
