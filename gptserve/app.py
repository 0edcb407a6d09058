"""The FastAPI application: wires engines to the OpenAI routes, Triton's KServe v2 routes and gRPC
service, `/health`, `/metrics`, the chat page at `/` and the API key.

`build_app` is the one place that assembles a server. The OpenAI routes serve one engine; the Triton
front-ends (HTTP routes here, gRPC on its own port, started on the same event loop by the app's lifespan)
serve every model of the `ModelRegistry`, the OpenAI engine included. What other front-ends need is on
`app.state`: `async_engine`, `registry`, `metrics`, `serving` and `require_api_key` (the dependency
that guards a route with `--api-key`).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware

from gptserve import __version__
from gptserve.engine.chat_template import ChatTemplate, load_template_source
from gptserve.engine.engine_options import EngineOptions
from gptserve.engine.llm_engine import LLMEngine
from gptserve.frontend.api_error import APIError
from gptserve.frontend.async_engine import AsyncEngine
from gptserve.frontend.metrics import ServerMetrics
from gptserve.frontend.request_log import RequestLogMiddleware
from gptserve.server.body_limit import BodySizeLimit
from gptserve.server.errors import error_response, install_error_handlers
from gptserve.server.openai_routes import build_openai_router
from gptserve.server.openapi_doc import UNAVAILABLE, install_openapi
from gptserve.server.serving import OpenAIServing
from gptserve.triton.grpc_server import start_grpc_server
from gptserve.triton.http_routes import build_triton_router
from gptserve.triton.llm_model import LLMModel
from gptserve.triton.metrics import TritonMetricsCollector
from gptserve.triton.registry import ModelRegistry
from gptserve.web import build_web_router

GRPC_DRAIN_SECONDS = 10.0
DEFAULT_MAX_REQUEST_BYTES = 16 << 20


@dataclass
class ServerConfig:
    """The serve flags that shape the HTTP front-end (the engine's own are in `EngineOptions`)."""

    served_model_names: list[str] = field(default_factory=list)  # empty = the engine's model name
    api_key: str | None = None
    chat_template: str | None = None  # a file or the template text; None = the model's own
    max_queue_len: int | None = None
    model_path: str | None = None
    grpc_host: str = "127.0.0.1"
    grpc_port: int | None = None  # None = no gRPC service
    max_request_bytes: int | None = DEFAULT_MAX_REQUEST_BYTES  # None = no limit
    request_timeout: float | None = None  # seconds; None = none
    allowed_origins: list[str] = field(default_factory=list)  # CORS; empty = no CORS headers
    tool_call_parser: str = "auto"  # the tool-call format; auto = the one the chat template shows
    reasoning_parser: str = "none"  # how thinking is told from the answer (`reasoning_content`)
    # The Triton name of the served model; None = the first served name. Triton names a model after its
    # directory, so a model served from a path gets the path's last part (`models/tiny-llama` ->
    # `tiny-llama`), which `/v2/models/{name}/...` can address.
    triton_model_name: str | None = None


def make_api_key_check(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency that answers 401 unless the request carries `Authorization: Bearer <key>`."""
    expected = api_key.encode() if api_key else None

    async def require_api_key(request: Request) -> None:
        if expected is None:
            return
        header = request.headers.get("authorization")
        if not header:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")  # fmt: skip
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), expected):
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")

    return require_api_key


def _chat_template(engine: LLMEngine, override: str | None) -> ChatTemplate:
    tokenizer = engine.tokenizer
    model_template = engine.chat_template or getattr(tokenizer, "chat_template", None)
    special = {}
    if tokenizer is not None:
        special = {
            name: getattr(tokenizer, name, None)
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
    return ChatTemplate(load_template_source(override, model_template), special)


def build_app(
    engine: LLMEngine | AsyncEngine, config: ServerConfig | None = None, registry: ModelRegistry | None = None
) -> FastAPI:
    """A ready app over `engine`; its lifespan starts and stops the engines and the gRPC service.

    An `LLMEngine` is the app's own: it is started here and joins the registry under the first served
    name. An `AsyncEngine` already belongs to a model of `registry`, which starts it."""
    config = config or ServerConfig()
    owns_engine = isinstance(engine, LLMEngine)
    async_engine = AsyncEngine(engine) if isinstance(engine, LLMEngine) else engine
    llm = async_engine.engine
    names = config.served_model_names or [llm.model_name]
    registry = registry if registry is not None else ModelRegistry([], EngineOptions())
    if owns_engine:
        registry.add_llm(config.triton_model_name or names[0], async_engine)
    model_engines = [m.engine for m in registry.models() if isinstance(m, LLMModel)]
    for model_engine in [async_engine, *model_engines]:
        model_engine.max_queue_len = config.max_queue_len
        model_engine.request_timeout = config.request_timeout
    metrics = ServerMetrics(names[0], lambda: async_engine.stats)
    metrics.registry.register(TritonMetricsCollector(registry.models))
    async_engine.metrics = metrics
    async_engine.inputs.chat_template = _chat_template(llm, config.chat_template)
    serving = OpenAIServing(
        async_engine,
        names,
        config.max_queue_len,
        config.model_path,
        config.tool_call_parser,
        config.reasoning_parser,
    )
    require_api_key = make_api_key_check(config.api_key)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if owns_engine:
            async_engine.start()
        grpc_server = None
        try:
            await registry.start()
            if config.grpc_port is not None:
                grpc_server = await start_grpc_server(
                    registry, config.grpc_host, config.grpc_port, config.api_key, config.max_request_bytes
                )
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(GRPC_DRAIN_SECONDS)
            await registry.stop()
            if owns_engine:
                await async_engine.stop()

    # The OpenAPI document, like /health and the chat page, is served without the API key: it is static
    # and holds no data. Interactive docs are not served (they would load scripts from a CDN).
    app = FastAPI(
        title="gptserve", version=__version__, lifespan=lifespan,
        docs_url=None, redoc_url=None, openapi_url="/openapi.json",
    )  # fmt: skip
    install_openapi(app)
    app.state.async_engine = async_engine
    app.state.registry = registry
    app.state.metrics = metrics
    app.state.serving = serving
    app.state.require_api_key = require_api_key
    install_error_handlers(app)
    if config.allowed_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=config.allowed_origins, allow_methods=["*"], allow_headers=["*"]
        )
    if config.max_request_bytes:
        app.add_middleware(BodySizeLimit, max_bytes=config.max_request_bytes)
    app.add_middleware(RequestLogMiddleware)  # outermost: logs refusals by the limits too

    @app.get("/health", responses=UNAVAILABLE)
    async def health() -> Response:
        if async_engine.dead:
            return error_response(APIError(503, f"the engine has failed: {async_engine.error!r}"))
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    app.include_router(build_openai_router(serving, require_api_key))
    # KServe v2 has its own protocol description; the page is not an API.
    app.include_router(build_triton_router(registry, require_api_key), include_in_schema=False)
    app.include_router(build_web_router(), include_in_schema=False)
    return app
