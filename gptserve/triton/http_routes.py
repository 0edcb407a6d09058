"""Triton's KServe v2 HTTP routes: health, metadata, config, infer, generate, statistics and the model
repository, every error in Triton's body `{"error": "<message>"}`.

Status codes follow Triton: 400 for bad requests, 401 for a missing or wrong API key, 404 for unknown
models and routes, 408 for a request over `--request-timeout`, 413 for a body over `--max-request-bytes`,
501 for extensions gptserve does not implement (shared memory, trace, logging), 503 while not ready or
at the queue limit (with `Retry-After`), 500 for server faults. Every route except `/v2/health/*` needs
the API key. A client that goes away cancels its model coroutine, which aborts its engine requests.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from google.protobuf import descriptor as pbd
from google.protobuf import json_format
from google.protobuf.message import Message
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptserve.errors import GptServeError, InvalidRequestError, QueueFullError
from gptserve.frontend.api_error import APIError
from gptserve.frontend.disconnect import cancel_on_disconnect
from gptserve.triton import http_codec as codec
from gptserve.triton.server_info import (
    SERVER_EXTENSIONS,
    SERVER_NAME,
    SERVER_VERSION,
    ready_versions,
    server_ready,
    serving_model,
)
from gptserve.triton.types import (
    Duration,
    InferResponse,
    ModelStats,
    TritonError,
    TritonModel,
    check_request,
)

logger = logging.getLogger(__name__)

DECOUPLED_INFER = "HTTP end point doesn't support models with decoupled transaction policy"


def triton_error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class TritonRoute(APIRoute):
    """A route whose every failure, its dependencies' (the API key) included, answers in Triton's form."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def triton_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except TritonError as e:
                return triton_error_response(e.status, e.message)
            except APIError as e:
                return triton_error_response(e.status, e.message, e.headers)
            except StarletteHTTPException as e:
                return triton_error_response(e.status_code, str(e.detail), getattr(e, "headers", None))
            except QueueFullError as e:
                return triton_error_response(e.http_status, str(e), {"Retry-After": "1"})
            except GptServeError as e:
                return triton_error_response(e.http_status, str(e))
            except Exception as e:
                logger.exception("internal error on %s %s", request.method, request.url.path)
                return triton_error_response(500, f"internal server error: {type(e).__name__}: {e}")

        return triton_handler


# ------------------------------------------------------------------------------------------ JSON forms
_INT64_TYPES = {
    pbd.FieldDescriptor.TYPE_INT64,
    pbd.FieldDescriptor.TYPE_UINT64,
    pbd.FieldDescriptor.TYPE_SINT64,
    pbd.FieldDescriptor.TYPE_FIXED64,
    pbd.FieldDescriptor.TYPE_SFIXED64,
}


def _int64_as_numbers(desc: pbd.Descriptor, obj: dict[str, Any]) -> None:
    """Protobuf's JSON writes 64-bit integers as strings; Triton writes them as numbers."""
    for fd in desc.fields:
        if fd.name not in obj:
            continue
        value = obj[fd.name]
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            value_fd = fd.message_type.fields_by_name["value"]
            for key in value:
                if value_fd.message_type is not None:
                    _int64_as_numbers(value_fd.message_type, value[key])
                elif value_fd.type in _INT64_TYPES:
                    value[key] = int(value[key])
        elif fd.message_type is not None:
            for item in value if isinstance(value, list) else [value]:
                _int64_as_numbers(fd.message_type, item)
        elif fd.type in _INT64_TYPES:
            obj[fd.name] = [int(v) for v in value] if isinstance(value, list) else int(value)


def config_json(config: Message) -> dict[str, Any]:
    """`ModelConfig` as Triton's `/config` answers it: proto field names, defaults included, 64-bit
    integers as numbers, enums by name."""
    obj = json_format.MessageToDict(
        config, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    _int64_as_numbers(config.DESCRIPTOR, obj)
    return obj


def _duration(d: Duration) -> dict[str, int]:
    return {"count": d.count, "ns": d.ns}


def stats_json(model: TritonModel) -> dict[str, Any]:
    """One entry of `model_stats`, in Triton's JSON form."""
    s: ModelStats = model.stats
    return {
        "name": model.name,
        "version": str(model.version),
        "last_inference": s.last_inference_ms,
        "inference_count": s.inference_count,
        "execution_count": s.execution_count,
        "inference_stats": {
            **{field: _duration(d) for field, d in s.inference_durations().items()},
            "cache_hit": _duration(Duration()),
            "cache_miss": _duration(Duration()),
        },
        "response_stats": {},
        "batch_stats": [],
        "memory_usage": [],
    }


def _tensor_metadata(specs: list) -> list[dict[str, Any]]:
    return [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in specs]


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


# ------------------------------------------------------------------------------------------ the router
def build_triton_router(registry: Any, require_api_key: Callable) -> APIRouter:
    """Every KServe v2 / Triton HTTP route over `registry` (the model registry of the Triton front-end);
    `require_api_key` is the app's API-key dependency."""
    router = APIRouter(route_class=TritonRoute)
    guarded = [Depends(require_api_key)]

    def engine_dead(request: Request) -> bool:
        engine = getattr(request.app.state, "async_engine", None)
        return bool(engine is not None and engine.dead)

    # -------------------------------------------------------------------------------------- health
    @router.get("/v2/health/live")
    async def live(request: Request) -> Response:
        return Response(status_code=503 if engine_dead(request) else 200)

    @router.get("/v2/health/ready")
    async def ready(request: Request) -> Response:
        ready = not engine_dead(request) and server_ready(registry)
        return Response(status_code=200 if ready else 503)

    @router.get("/v2", dependencies=guarded)
    async def server_metadata() -> JSONResponse:
        return JSONResponse(
            {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(SERVER_EXTENSIONS)}
        )

    # ---------------------------------------------------------------------------------- statistics
    # Declared before /v2/models/{model_name} so that `/v2/models/stats` is not read as a model name.
    @router.get("/v2/models/stats", dependencies=guarded)
    async def all_stats() -> JSONResponse:
        return JSONResponse({"model_stats": [stats_json(m) for m in registry.models()]})

    @router.get("/v2/models/{model_name}/stats", dependencies=guarded)
    @router.get("/v2/models/{model_name}/versions/{version}/stats", dependencies=guarded)
    async def model_stats(model_name: str, version: str = "") -> JSONResponse:
        if version:
            models = [registry.get(model_name, version)]
        else:
            models = [m for m in registry.models() if m.name == model_name] or [registry.get(model_name)]
        return JSONResponse({"model_stats": [stats_json(m) for m in models]})

    # ---------------------------------------------------------------------------------- model info
    @router.get("/v2/models/{model_name}", dependencies=guarded)
    @router.get("/v2/models/{model_name}/versions/{version}", dependencies=guarded)
    async def model_metadata(model_name: str, version: str = "") -> JSONResponse:
        model = registry.get(model_name, version)
        return JSONResponse(
            {
                "name": model.name,
                "versions": ready_versions(registry, model),
                "platform": model.platform,
                "inputs": _tensor_metadata(model.inputs),
                "outputs": _tensor_metadata(model.outputs),
            }
        )

    @router.get("/v2/models/{model_name}/ready", dependencies=guarded)
    @router.get("/v2/models/{model_name}/versions/{version}/ready", dependencies=guarded)
    async def model_ready(model_name: str, version: str = "") -> Response:
        serving_model(registry, model_name, version)
        return Response(status_code=200)

    @router.get("/v2/models/{model_name}/config", dependencies=guarded)
    @router.get("/v2/models/{model_name}/versions/{version}/config", dependencies=guarded)
    async def model_config(model_name: str, version: str = "") -> JSONResponse:
        return JSONResponse(config_json(registry.get(model_name, version).config))

    # ---------------------------------------------------------------------------------- inference
    @router.post("/v2/models/{model_name}/infer", dependencies=guarded)
    @router.post("/v2/models/{model_name}/versions/{version}/infer", dependencies=guarded)
    async def infer(request: Request, model_name: str, version: str = "") -> Response:
        model = serving_model(registry, model_name, version)
        infer_request, fmt = codec.decode_infer_request(
            await request.body(),
            model.name,
            str(model.version),
            header_length=request.headers.get(codec.HEADER_LENGTH),
            content_encoding=request.headers.get("content-encoding"),
            model_inputs=model.inputs,
        )
        check_request(model, infer_request)
        if not model.answers_once(infer_request):
            raise TritonError(DECOUPLED_INFER)
        result = await cancel_on_disconnect(request, model.infer(infer_request))
        if not isinstance(result, InferResponse):
            return result
        body, headers = codec.encode_infer_response(result, fmt)
        body, encoding = codec.compress(body, request.headers.get("accept-encoding"))
        if encoding:
            headers["Content-Encoding"] = encoding
        return Response(body, headers=headers)

    async def _generate_request(request: Request, model_name: str, version: str):
        model = serving_model(registry, model_name, version)
        body = codec.decompress(await request.body(), request.headers.get("content-encoding"))
        gen_request = codec.decode_generate_request(body, model.name, str(model.version), model.inputs)
        check_request(model, gen_request)
        return model, gen_request

    @router.post("/v2/models/{model_name}/generate", dependencies=guarded)
    @router.post("/v2/models/{model_name}/versions/{version}/generate", dependencies=guarded)
    async def generate(request: Request, model_name: str, version: str = "") -> Response:
        model, gen_request = await _generate_request(request, model_name, version)
        result = await cancel_on_disconnect(request, model.infer(gen_request))
        if not isinstance(result, InferResponse):
            return result
        return JSONResponse(codec.generate_response_json(result))

    @router.post("/v2/models/{model_name}/generate_stream", dependencies=guarded)
    @router.post("/v2/models/{model_name}/versions/{version}/generate_stream", dependencies=guarded)
    async def generate_stream(request: Request, model_name: str, version: str = "") -> Response:
        model, gen_request = await _generate_request(request, model_name, version)
        responses = model.responses(gen_request)
        # The first response is awaited before the status line, so that a request the model refuses
        # gets its 4xx; failures after it can only travel inside the stream.
        try:
            first = await cancel_on_disconnect(request, anext(responses, None))
        except BaseException:
            await _close(responses)
            raise
        if isinstance(first, Response):
            await _close(responses)
            return first
        return StreamingResponse(_events(first, responses), media_type="text/event-stream; charset=utf-8")

    async def _events(
        first: InferResponse | None, responses: AsyncIterator[InferResponse]
    ) -> AsyncIterator[str]:
        try:
            response = first
            while response is not None:
                if response.outputs:
                    yield _sse(codec.generate_response_json(response))
                response = await anext(responses, None)
        except TritonError as e:
            yield _sse({"error": e.message})
        except InvalidRequestError as e:
            yield _sse({"error": str(e)})
        except Exception as e:
            logger.exception("generate_stream failed")
            yield _sse({"error": f"internal server error: {type(e).__name__}: {e}"})
        finally:
            await _close(responses)

    # ---------------------------------------------------------------------------------- repository
    @router.post("/v2/repository/index", dependencies=guarded)
    async def repository_index(request: Request) -> JSONResponse:
        body = codec.parse_json_object(await request.body())
        return JSONResponse(registry.index(ready_only=bool(body.get("ready", False))))

    @router.post("/v2/repository/models/{model_name}/load", dependencies=guarded)
    async def repository_load(request: Request, model_name: str) -> Response:
        body = codec.parse_json_object(await request.body())
        params = body.get("parameters") or {}
        if not isinstance(params, dict):
            raise TritonError("'parameters' must be an object")
        config = params.get("config")
        if config is not None and not isinstance(config, str):
            raise TritonError("parameter 'config' must be a string holding the model configuration as JSON")
        files = _override_files(params)
        if files and config is None:
            raise TritonError(f"file overrides for model '{model_name}' need the 'config' parameter as well")
        await registry.load(model_name, config_json=config, files=files or None)
        return Response(status_code=200)

    @router.post("/v2/repository/models/{model_name}/unload", dependencies=guarded)
    async def repository_unload(request: Request, model_name: str) -> Response:
        body = codec.parse_json_object(await request.body())
        params = body.get("parameters") or {}
        if not isinstance(params, dict):
            raise TritonError("'parameters' must be an object")
        await registry.unload(model_name, unload_dependents=bool(params.get("unload_dependents", False)))
        return Response(status_code=200)

    # ---------------------------------------------------------------------------------- unsupported
    def unsupported(what: str) -> Callable:
        async def handler(request: Request) -> Response:
            raise TritonError(
                f"{what} ({request.method} {request.url.path}) is not supported by gptserve", 501
            )

        return handler

    for path, what in (
        ("/v2/systemsharedmemory/{rest:path}", "system shared memory"),
        ("/v2/cudasharedmemory/{rest:path}", "CUDA shared memory"),
        ("/v2/trace/setting", "tracing"),
        ("/v2/models/{model_name}/trace/setting", "tracing"),
        ("/v2/logging", "the logging extension"),
    ):
        router.add_api_route(path, unsupported(what), methods=["GET", "POST"], dependencies=guarded)

    @router.api_route("/v2/{rest:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def no_route(request: Request) -> Response:
        raise TritonError(f"no route {request.method} {request.url.path}", 404)

    return router


async def _close(responses: AsyncIterator[InferResponse]) -> None:
    aclose = getattr(responses, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:
            logger.exception("closing a model's response stream failed")


def _override_files(params: dict[str, Any]) -> dict[str, bytes]:
    """The `file:<version>/<name>` load parameters, base64 on the wire, as {key: content}."""
    files: dict[str, bytes] = {}
    for key, value in params.items():
        if not key.startswith("file:"):
            continue
        if not isinstance(value, str):
            raise TritonError(f"load parameter '{key}' must be a base64 string")
        try:
            files[key] = base64.b64decode(value, validate=True)
        except binascii.Error as e:
            raise TritonError(f"load parameter '{key}' is not valid base64: {e}") from None
    return files
