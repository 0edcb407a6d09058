"""`gptserve serve`: load models and serve them: the OpenAI-compatible API, Triton's KServe v2 protocol
over HTTP and gRPC (every model of `--model-repository` directories, and MODEL), health and metrics.

The OpenAI routes serve MODEL, or without one the first LLM of the repositories, or else the embedded
default model.

SIGINT/SIGTERM stop accepting connections, let in-flight requests finish, then exit 0; a second SIGINT
forces the exit. If the engine thread dies, `/health`, `/v2/health/ready` and every request answer 503
for `ENGINE_DEATH_GRACE_S` (so that monitors and clients see why), then the server shuts down and the
process exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import logging
import os
import socket
import sys
from pathlib import Path

from gptserve.errors import GptServeError

GiB = 1 << 30
ENGINE_DEATH_GRACE_S = 2.0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from gptserve.cli import HelpFormatter, add_engine_args
    from gptserve.server.reasoning import REASONING_PARSERS
    from gptserve.server.tool_parsers import PARSER_NAMES

    p = sub.add_parser(
        "serve",
        help="serve models over HTTP and gRPC (OpenAI and Triton APIs)",
        description="Serve models: OpenAI API, Triton KServe v2 and /metrics on the HTTP port (8000), "
        "Triton gRPC on 8001, /metrics alone on 8002.",
        formatter_class=HelpFormatter,
    )
    add_engine_args(p)
    p.add_argument(
        "--model-repository", action="append", default=[], metavar="DIR",
        help="Triton model repository (DIR/<model>/config.pbtxt + version directories); repeatable",
    )  # fmt: skip
    p.add_argument(
        "--model-control-mode", choices=["none", "explicit"], default="none",
        help="explicit: models load and unload only through the repository API (Triton's flag)",
    )  # fmt: skip
    p.add_argument(
        "--exit-on-error", nargs="?", const=True, default=False, type=_flag_value, metavar="BOOL",
        help="exit at start-up when a repository model fails to load (Triton's flag; Triton's default is "
        "true). Default false: the other models are served and the failed ones are listed UNAVAILABLE "
        "with their reasons, in the banner and the repository index",
    )  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument(
        "--http-port", "--port", dest="http_port", type=int, default=8000,
        help="HTTP port: OpenAI API, KServe v2, metrics (--port is the same flag)",
    )  # fmt: skip
    p.add_argument("--grpc-port", type=int, default=8001, help="Triton gRPC port; 0 = none")
    p.add_argument(
        "--metrics-port", type=int, default=8002, help="second port serving only /metrics; 0 = none"
    )
    p.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $GPTSERVE_API_KEY)"
    )
    p.add_argument("--served-model-name", nargs="+", default=None, help="name(s) clients use for the model")
    p.add_argument("--chat-template", default=None, help="jinja2 chat template file overriding the model's")
    p.add_argument(
        "--tool-call-parser", choices=PARSER_NAMES, default="auto",
        help="how the model writes tool calls: hermes, llama3_json, mistral, or generic (the server "
        "describes the tools in a system message, Hermes's format); auto (default) = the one the chat "
        "template shows",
    )  # fmt: skip
    p.add_argument(
        "--reasoning-parser", choices=REASONING_PARSERS, default="none",
        help="serve a reasoning model's thinking apart from its answer, as `reasoning_content`: qwen3 "
        "(<think>...</think> in the output) or deepseek_r1 (the prompt opens <think>); none (default)",
    )  # fmt: skip
    p.add_argument(
        "--max-queue-len", type=int, default=None, help="waiting requests beyond which new ones get 503"
    )
    p.add_argument(
        "--max-request-bytes", type=int, default=16 << 20,
        help="largest request body (HTTP) or message (gRPC); larger ones get 413 / RESOURCE_EXHAUSTED; "
        "0 = no limit",
    )  # fmt: skip
    p.add_argument(
        "--request-timeout", type=float, default=None, metavar="SECONDS",
        help="abort a request still running after this many seconds (408 / DEADLINE_EXCEEDED)",
    )  # fmt: skip
    p.add_argument(
        "--allowed-origins", nargs="+", default=None, metavar="ORIGIN",
        help="answer CORS requests from these origins ('*' = any); without it no CORS headers are sent",
    )  # fmt: skip


PORT_FLAGS = (("http_port", "--http-port"), ("grpc_port", "--grpc-port"), ("metrics_port", "--metrics-port"))


def check_ports(args: argparse.Namespace) -> None:
    """Each requested port is in range, distinct and free on `--host`: bound and released at once, so
    that a busy port is reported in one line before any model loads (the servers bind them for real
    later, and the banner comes only once they have)."""
    seen: dict[int, str] = {}
    for attr, flag in PORT_FLAGS:
        port = getattr(args, attr)
        if port == 0 and attr != "http_port":
            continue  # 0 = that server is off
        if not 1 <= port <= 65535:
            off = "" if attr == "http_port" else "; 0 = off"
            raise GptServeError(f"{flag} {port}: not a TCP port (1-65535{off})")
        if port in seen:
            raise GptServeError(f"{flag} {port}: the same port as {seen[port]}")
        seen[port] = flag
        try:
            infos = socket.getaddrinfo(args.host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as e:
            raise GptServeError(f"--host {args.host}: cannot resolve it ({e.strerror})") from None
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn and gRPC bind
            try:
                s.bind(address)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    cause = "already in use"
                elif e.errno == errno.EACCES:
                    cause = "permission denied (ports below 1024 need privileges)"
                elif e.errno == errno.EADDRNOTAVAIL:
                    cause = f"address {args.host} is not on this machine"
                else:
                    cause = e.strerror or str(e)
                raise GptServeError(f"{flag} {port}: cannot listen on {args.host}:{port}: {cause}") from None


def _banner(engine, names: list[str], args: argparse.Namespace, template_source: str, registry) -> str:
    cfg = engine.config
    kv = engine.core.kv
    tokens = kv.num_blocks * kv.block_size
    kv_bytes = cfg.cache.kv_cache_memory or 0
    base = f"http://{args.host}:{args.http_port}"
    metrics = f"{base}/metrics" + (
        f" and http://{args.host}:{args.metrics_port}/metrics" if args.metrics_port else ""
    )
    source = args.model or ("from the model repository" if args.model_repository else None)
    lines = [
        f"gptserve: serving {', '.join(names)}",
        f"  model          {source or 'embedded default (SmolLM2-135M-Instruct GGUF)'}",
        f"  architecture   {engine.model_config.architecture}",
        f"  dtype, device  {str(cfg.dtype).removeprefix('torch.')}, {cfg.device}",
        f"  context        max_model_len {engine.max_model_len} tokens",
        f"  KV cache       {tokens:,} tokens in {kv.num_blocks} blocks of {kv.block_size} "
        f"({kv_bytes:,} bytes, {kv_bytes / GiB:.2f} GiB)",
        f"  chat template  {template_source}",
        f"  OpenAI API     {base}/v1  (API key {'required' if args.api_key else 'not required'})",
        f"  KServe v2      {base}/v2"
        + (f"  gRPC {args.host}:{args.grpc_port}" if args.grpc_port else "  (gRPC off)"),
        f"  health         {base}/health",
        f"  metrics        {metrics}",
        "  Triton models  " + ("none" if not registry.index() else ""),
    ]
    for row in registry.index():
        reason = f"  {row['reason']}" if row["reason"] else ""
        lines.append(f"    {row['name']:<24} {row['version'] or '-':>4}  {row['state']}{reason}")
    return "\n".join(lines)


def _flag_value(text: str) -> bool:
    """Triton's boolean flag values (`--exit-on-error=false`)."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def triton_name(model: str) -> str:
    """The Triton name of a model served from `model` (a path or a name): its last path part, without a
    GGUF file's extension, as Triton names a model after its directory."""
    path = Path(model)
    name = path.stem if path.suffix.lower() == ".gguf" else path.name
    return name or model


def run(args: argparse.Namespace) -> int:
    import uvicorn
    from prometheus_client import start_http_server

    from gptserve.app import ServerConfig, build_app
    from gptserve.cli import engine_options
    from gptserve.engine.builder import build_engine
    from gptserve.server.draining_server import DrainingServer
    from gptserve.triton.registry import ModelRegistry

    args.api_key = args.api_key or os.environ.get("GPTSERVE_API_KEY") or None
    check_ports(args)
    if args.max_queue_len is not None and args.max_queue_len < 1:
        print("gptserve serve: error: --max-queue-len must be at least 1", file=sys.stderr)
        return 2
    if args.max_request_bytes < 0:
        print("gptserve serve: error: --max-request-bytes must be >= 0 (0 = no limit)", file=sys.stderr)
        return 2
    if args.request_timeout is not None and args.request_timeout <= 0:
        print("gptserve serve: error: --request-timeout must be positive", file=sys.stderr)
        return 2
    options = engine_options(args)
    registry = ModelRegistry(
        [Path(d) for d in args.model_repository], options, explicit=args.model_control_mode == "explicit"
    )
    registry.load_all(engines_after=0 if args.model is None else 1)
    if args.exit_on_error and registry.failed():
        for row in registry.failed():
            version = f" version {row['version']}" if row["version"] else ""
            print(f"gptserve serve: error: model '{row['name']}'{version} failed to load: {row['reason']}",
                  file=sys.stderr)  # fmt: skip
        print("gptserve serve: exiting (--exit-on-error)", file=sys.stderr)
        return 1
    repository_llms = registry.llm_engines()
    if args.model is None and repository_llms:
        name, engine = repository_llms[0]
        default_names = [name]
    else:
        engine = build_engine(args.model, options)
        default_names = [engine.model_name]
    config = ServerConfig(
        served_model_names=args.served_model_name or default_names,
        api_key=args.api_key,
        chat_template=args.chat_template,
        max_queue_len=args.max_queue_len,
        model_path=str(args.model) if args.model else None,
        grpc_host=args.host,
        grpc_port=args.grpc_port or None,
        max_request_bytes=args.max_request_bytes or None,
        request_timeout=args.request_timeout,
        allowed_origins=args.allowed_origins or [],
        tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser,
        triton_model_name=None if args.served_model_name else triton_name(default_names[0]),
    )
    app = build_app(engine, config, registry)
    async_engine = app.state.async_engine
    if args.chat_template:
        template_source = f"from {args.chat_template}"
    elif app.state.serving.chat_template.available:
        template_source = "the model's"
    else:
        template_source = "none (chat completions answer 400; pass --chat-template)"
    llm = async_engine.engine
    banner = _banner(llm, config.served_model_names, args, template_source, registry)
    # What start-up built (modules, weights, tokenizers, routes) lives as long as the server: keep it out
    # of the cyclic garbage collector's full passes, which would otherwise walk it in the middle of steps.
    gc.freeze()

    class AnnouncingServer(DrainingServer):
        """Prints the banner once every socket is bound (gRPC in the lifespan, then HTTP): a port that
        turned out busy is never announced."""

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started and not self.should_exit:
                print(banner, flush=True)

    log_level = getattr(args, "log_level", "info")
    server = AnnouncingServer(
        uvicorn.Config(app, host=args.host, port=args.http_port, log_level=log_level, lifespan="on")
    )
    async_engine.on_dead.append(  # runs on the event loop
        lambda error: asyncio.get_running_loop().call_later(
            ENGINE_DEATH_GRACE_S, setattr, server, "should_exit", True
        )
    )
    metrics_server = None
    if args.metrics_port:
        try:
            metrics_server, _ = start_http_server(
                args.metrics_port, addr=args.host, registry=app.state.metrics.registry
            )
        except OSError as e:
            raise GptServeError(f"--metrics-port {args.metrics_port}: cannot listen: {e.strerror}") from None
    try:
        asyncio.run(server.serve())
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
    if async_engine.dead:
        logging.getLogger(__name__).error("exiting: the engine thread failed: %r", async_engine.error)
        return 1
    return 0 if server.started else 1
