"""Triton's `inference.GRPCInferenceService` over the model registry, on `grpc.aio`.

`TritonGrpcServicer` answers every call of the service with the messages shipped in `tritonclient`:
health, metadata, config, statistics, repository index/load/unload, `ModelInfer` and the bidirectional
`ModelStreamInfer`. It runs on the same event loop as the HTTP app, so models and their engines are
shared. A `TritonError` becomes the gRPC status matching its HTTP status. On a stream, errors travel in
`error_message` of a `ModelStreamInferResponse` and the stream stays open; requests on one stream run
concurrently and every response carries its request's id. A cancelled call, or a stream the client
closed, cancels the model coroutines serving it, which aborts their engine requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from gptserve.errors import GptServeError, QueueFullError
from gptserve.frontend.request_log import log_call
from gptserve.triton.grpc_codec import (
    decode_request,
    encode_response,
    parameter_value,
    stream_error,
    stream_response,
)
from gptserve.triton.server_info import (
    SERVER_EXTENSIONS,
    SERVER_NAME,
    SERVER_VERSION,
    ready_versions,
    server_ready,
    serving_model,
)
from gptserve.triton.types import InferRequest, InferResponse, TritonError, TritonModel, check_request

logger = logging.getLogger(__name__)

PUBLIC_METHODS = frozenset({"ServerLive", "ServerReady", "ModelReady"})
DECOUPLED_MODEL_INFER = "ModelInfer RPC doesn't support models with decoupled transaction policy"
ENABLE_EMPTY_FINAL = "triton_enable_empty_final_response"
SHARED_MEMORY_UNSUPPORTED = "shared memory is not supported by this server; send tensor data in the request"

STATUS_CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    409: grpc.StatusCode.ALREADY_EXISTS,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_code(status: int) -> grpc.StatusCode:
    """HTTP-style status of a `TritonError` -> gRPC status code."""
    if status in STATUS_CODES:
        return STATUS_CODES[status]
    return grpc.StatusCode.INVALID_ARGUMENT if 400 <= status < 500 else grpc.StatusCode.INTERNAL


def as_triton_error(error: Exception) -> TritonError:
    """Any exception raised while serving a call -> the `TritonError` to answer with."""
    if isinstance(error, TritonError):
        return error
    if isinstance(error, QueueFullError):
        return TritonError(str(error), 429)  # RESOURCE_EXHAUSTED: retry later
    if isinstance(error, GptServeError):
        return TritonError(str(error), error.http_status)
    logger.exception("gRPC call failed", exc_info=error)
    return TritonError(f"internal error: {type(error).__name__}: {error}", 500)


def _rpc(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Unary handler: API-key check and a request log line (except health calls), then `TritonError`s
    become statuses."""
    public = method.__name__ in PUBLIC_METHODS

    @functools.wraps(method)
    async def handler(self: TritonGrpcServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if public:
            return await method(self, request, context)
        with log_call(f"gRPC {method.__name__}", getattr(request, "id", None) or None) as record:
            try:
                self.authorize(context)
                response = await method(self, request, context)
                record.status = grpc.StatusCode.OK.name
                return response
            except grpc.aio.AbortError:
                raise
            except Exception as e:
                error = as_triton_error(e)
                record.status = status_code(error.status).name
                await context.abort(status_code(error.status), error.message)

    return handler


class TritonGrpcServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Every call of `inference.GRPCInferenceService` over a model registry."""

    def __init__(self, registry: Any, api_key: str | None = None):
        self.registry = registry
        self.api_key = api_key or None

    def authorize(self, context: grpc.aio.ServicerContext) -> None:
        """Raises `TritonError` (401) unless the call carries `authorization: Bearer <api key>`."""
        if self.api_key is None:
            return
        for key, value in context.invocation_metadata() or ():
            if key.lower() != "authorization":
                continue
            scheme, _, token = str(value).partition(" ")
            if scheme.lower() == "bearer" and hmac.compare_digest(
                token.strip().encode(), self.api_key.encode()
            ):
                return
        raise TritonError("Unauthorized: this server needs metadata 'authorization: Bearer <api key>'", 401)

    # ------------------------------------------------------------------------------------- health
    @_rpc
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @_rpc
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=server_ready(self.registry))

    @_rpc
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        try:
            model = self.registry.get(request.name, request.version)
        except TritonError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=bool(model.ready))

    # ----------------------------------------------------------------------------------- metadata
    @_rpc
    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=SERVER_VERSION, extensions=SERVER_EXTENSIONS
        )

    @_rpc
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        model = self.registry.get(request.name, request.version)
        msg = pb.ModelMetadataResponse(name=model.name, platform=model.platform)
        msg.versions.extend(ready_versions(self.registry, model))
        for spec in model.inputs:
            msg.inputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        for spec in model.outputs:
            msg.outputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        return msg

    @_rpc
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        model = self.registry.get(request.name, request.version)
        return pb.ModelConfigResponse(config=model.config)

    @_rpc
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Any
    ) -> pb.ModelStatisticsResponse:
        if request.name:
            self.registry.get(request.name, request.version)  # 404 for an unknown model or version
        msg = pb.ModelStatisticsResponse()
        for model in self.registry.models():
            if request.name and model.name != request.name:
                continue
            if request.version and str(model.version) != request.version:
                continue
            msg.model_stats.append(model_statistics(model))
        return msg

    # --------------------------------------------------------------------------------- repository
    @_rpc
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Any
    ) -> pb.RepositoryIndexResponse:
        msg = pb.RepositoryIndexResponse()
        for entry in self.registry.index(ready_only=request.ready):
            msg.models.add(
                name=entry["name"],
                version=str(entry.get("version") or ""),
                state=entry.get("state") or "",
                reason=entry.get("reason") or "",
            )
        return msg

    @_rpc
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        config_json = None
        files: dict[str, bytes] = {}
        for key, param in request.parameters.items():
            value = parameter_value(param)
            if key == "config":
                if not isinstance(value, str):
                    raise TritonError("load parameter 'config' must be a JSON string")
                config_json = value
            elif key.startswith("file:"):
                if not isinstance(value, bytes):
                    raise TritonError(f"load parameter '{key}' must carry the file content as bytes")
                files[key] = value
        await self.registry.load(request.model_name, config_json=config_json, files=files or None)
        return pb.RepositoryModelLoadResponse()

    @_rpc
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        param = request.parameters.get("unload_dependents")
        dependents = bool(parameter_value(param)) if param is not None else False
        await self.registry.unload(request.model_name, unload_dependents=dependents)
        return pb.RepositoryModelUnloadResponse()

    # ---------------------------------------------------------------------------------- inference
    @_rpc
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        model = serving_model(self.registry, request.model_name, request.model_version)
        infer_request = decode_request(request)
        check_request(model, infer_request)
        if not model.answers_once(infer_request):
            raise TritonError(DECOUPLED_MODEL_INFER, 501)
        response = await model.infer(infer_request)
        _stamp(response, infer_request, model)
        return encode_response(response, infer_request.outputs)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        try:
            self.authorize(context)
        except TritonError as e:
            await context.abort(status_code(e.status), e.message)
        outbox: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        running: set[asyncio.Task] = set()

        async def read_requests() -> None:
            try:
                async for msg in request_iterator:
                    task = asyncio.create_task(self._serve_stream_request(msg, outbox.put_nowait))
                    running.add(task)
                    task.add_done_callback(running.discard)
            except grpc.RpcError:
                logger.debug("gRPC stream ended while reading requests", exc_info=True)
            while running:
                await asyncio.wait(set(running))
            outbox.put_nowait(None)

        reader = asyncio.create_task(read_requests())
        try:
            while (item := await outbox.get()) is not None:
                yield item
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()
            await asyncio.gather(reader, *running, return_exceptions=True)

    async def _serve_stream_request(
        self, msg: pb.ModelInferRequest, emit: Callable[[pb.ModelStreamInferResponse], None]
    ) -> None:
        """One request on a stream: every response it yields, the last flagged `triton_final_response`."""
        with log_call("gRPC ModelStreamInfer", msg.id or None) as record:
            await self._serve_logged_stream_request(msg, emit, record)

    async def _serve_logged_stream_request(
        self, msg: pb.ModelInferRequest, emit: Callable[[pb.ModelStreamInferResponse], None], record: Any
    ) -> None:
        request = InferRequest(model_name=msg.model_name, model_version=msg.model_version, id=msg.id)
        try:
            model = serving_model(self.registry, msg.model_name, msg.model_version)
            request = decode_request(msg)
            check_request(model, request)
            empty_final = model.decoupled and bool(request.parameters.get(ENABLE_EMPTY_FINAL, False))
            final_sent = False
            async with contextlib.aclosing(model.responses(request)) as responses:
                async for response in responses:
                    _stamp(response, request, model)
                    last = bool(response.final) and not empty_final
                    emit(stream_response(response, request.outputs, final=last))
                    if response.final:
                        final_sent = last
                        break
            if not final_sent:
                empty = InferResponse(model_name=model.name, model_version=str(model.version), id=request.id)
                emit(stream_response(empty, request.outputs, final=True))
            record.status = grpc.StatusCode.OK.name
        except asyncio.CancelledError:
            record.status = grpc.StatusCode.CANCELLED.name
            raise
        except Exception as e:
            error = as_triton_error(e)
            record.status = status_code(error.status).name
            emit(stream_error(error.message, request))

    # ------------------------------------------------------------------ shared memory, trace, log
    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryStatusResponse:
        return await self._shared_memory_status(request, context, pb.SystemSharedMemoryStatusResponse)

    async def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.CudaSharedMemoryStatusResponse:
        return await self._shared_memory_status(request, context, pb.CudaSharedMemoryStatusResponse)

    async def _shared_memory_status(self, request: Any, context: Any, response_type: type) -> Any:
        """No region is ever registered: the status of all regions is empty, a named one is unknown."""
        await self._guard(context)
        if request.name:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"Unable to find shared memory region: '{request.name}'"
            )
        return response_type()

    async def SystemSharedMemoryRegister(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._guard(context)
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, SHARED_MEMORY_UNSUPPORTED)

    async def CudaSharedMemoryRegister(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._guard(context)
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, SHARED_MEMORY_UNSUPPORTED)

    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        await self._guard(context)
        return pb.SystemSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        await self._guard(context)
        return pb.CudaSharedMemoryUnregisterResponse()

    async def TraceSetting(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._guard(context)
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "tracing is not supported by this server")

    async def LogSettings(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._guard(context)
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "log settings cannot be changed over gRPC; start the server with --log-level",
        )

    async def _guard(self, context: grpc.aio.ServicerContext) -> None:
        try:
            self.authorize(context)
        except TritonError as e:
            await context.abort(status_code(e.status), e.message)


def _stamp(response: InferResponse, request: InferRequest, model: TritonModel) -> None:
    """Every response names its request's id, and the model and version that served it."""
    response.id = request.id
    response.model_name = response.model_name or model.name
    response.model_version = str(response.model_version or model.version)


def model_statistics(model: TritonModel) -> pb.ModelStatistics:
    """`types.ModelStats` of one model version -> Triton's `ModelStatistics` message."""
    stats = model.stats
    msg = pb.ModelStatistics(
        name=model.name,
        version=str(model.version),
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
    )
    for field, duration in stats.inference_durations().items():
        target = getattr(msg.inference_stats, field)
        target.count = duration.count
        target.ns = duration.ns
    return msg


async def _add_health_service(server: grpc.aio.Server, registry: Any) -> None:
    """The standard `grpc.health.v1.Health` service, when `grpcio-health-checking` is installed: the
    server ("") and `inference.GRPCInferenceService` are SERVING while the registry is ready."""
    try:
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    except ImportError:
        logger.info("grpcio-health-checking is not installed: no grpc.health.v1 service")
        return
    except Exception as e:  # e.g. built for a protobuf major version other than tritonclient's
        logger.warning("grpc.health.v1 service unavailable: grpcio-health-checking failed to import: %s", e)
        return
    services = ("", pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name)

    class HealthServicer(health.aio.HealthServicer):
        async def Check(self, request: Any, context: Any) -> Any:
            if request.service not in services:
                return await super().Check(request, context)
            statuses = health_pb2.HealthCheckResponse
            status = statuses.SERVING if server_ready(registry) else statuses.NOT_SERVING
            return statuses(status=status)

    servicer = HealthServicer()
    for service in services:
        await servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)


async def start_grpc_server(
    registry: Any, host: str, port: int, api_key: str | None, max_request_bytes: int | None = None
) -> grpc.aio.Server:
    """Start Triton's gRPC service on `host:port` on the running event loop; `await server.stop(grace)`
    ends it. Requests larger than `max_request_bytes` are refused with RESOURCE_EXHAUSTED (None = no
    limit, as in Triton); responses have no size limit. Raises `RuntimeError` when the address cannot
    be bound."""
    options = [
        ("grpc.max_send_message_length", -1),
        ("grpc.max_receive_message_length", max_request_bytes or -1),
        ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
    ]
    server = grpc.aio.server(options=options)
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(TritonGrpcServicer(registry, api_key), server)
    await _add_health_service(server, registry)
    bracketed = f"[{host}]" if ":" in host and not host.startswith("[") else host
    try:
        bound = server.add_insecure_port(f"{bracketed}:{port}")
    except RuntimeError as e:
        raise RuntimeError(f"cannot listen for gRPC on {bracketed}:{port} (address in use?)") from e
    await server.start()
    logger.info("Triton gRPC service listening on %s:%d", bracketed, bound)
    return server
