"""`gptserve serve`: load a model and serve it over HTTP (OpenAI-compatible API, health, metrics).

SIGINT/SIGTERM stop accepting connections, let in-flight requests finish, then exit 0; a second SIGINT
forces the exit. If the engine thread dies the server shuts down and the process exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

GiB = 1 << 30


def add_parser(sub: argparse._SubParsersAction) -> None:
    from gptserve.cli import add_engine_args

    p = sub.add_parser("serve", help="serve a model over HTTP (OpenAI-compatible API)")
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port (OpenAI API, health, metrics)")
    p.add_argument(
        "--metrics-port", type=int, default=8002, help="second port serving only /metrics; 0 = none"
    )
    p.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $GPTSERVE_API_KEY)"
    )
    p.add_argument("--served-model-name", nargs="+", default=None, help="name(s) clients use for the model")
    p.add_argument("--chat-template", default=None, help="jinja2 chat template file overriding the model's")
    p.add_argument(
        "--max-queue-len", type=int, default=None, help="waiting requests beyond which new ones get 503"
    )
    p.add_argument("--log-level", default=argparse.SUPPRESS, choices=["debug", "info", "warning", "error"])


def _banner(engine, names: list[str], args: argparse.Namespace, template_source: str) -> str:
    cfg = engine.config
    tokens = engine.kv.num_blocks * engine.kv.block_size
    kv_bytes = cfg.cache.kv_cache_memory or 0
    base = f"http://{args.host}:{args.http_port}"
    metrics = f"{base}/metrics" + (
        f" and http://{args.host}:{args.metrics_port}/metrics" if args.metrics_port else ""
    )
    lines = [
        f"gptserve: serving {', '.join(names)}",
        f"  model          {args.model or 'embedded default (SmolLM2-135M-Instruct GGUF)'}",
        f"  architecture   {engine.model_config.architecture}",
        f"  dtype, device  {str(cfg.dtype).removeprefix('torch.')}, {cfg.device}",
        f"  context        max_model_len {engine.max_model_len} tokens",
        f"  KV cache       {tokens:,} tokens in {engine.kv.num_blocks} blocks of {engine.kv.block_size} "
        f"({kv_bytes:,} bytes, {kv_bytes / GiB:.2f} GiB)",
        f"  chat template  {template_source}",
        f"  OpenAI API     {base}/v1  (API key {'required' if args.api_key else 'not required'})",
        f"  health         {base}/health",
        f"  metrics        {metrics}",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import uvicorn
    from prometheus_client import start_http_server

    from gptserve.cli import engine_options
    from gptserve.engine.builder import build_engine
    from gptserve.server.app import ServerConfig, build_app
    from gptserve.server.draining_server import DrainingServer

    args.api_key = args.api_key or os.environ.get("GPTSERVE_API_KEY") or None
    if args.max_queue_len is not None and args.max_queue_len < 1:
        print("gptserve serve: error: --max-queue-len must be at least 1", file=sys.stderr)
        return 2
    engine = build_engine(args.model, engine_options(args))
    config = ServerConfig(
        served_model_names=args.served_model_name or [engine.model_name],
        api_key=args.api_key,
        chat_template=args.chat_template,
        max_queue_len=args.max_queue_len,
        model_path=str(args.model) if args.model else None,
    )
    app = build_app(engine, config)
    async_engine = app.state.async_engine
    if args.chat_template:
        template_source = f"from {args.chat_template}"
    elif app.state.serving.chat_template.available:
        template_source = "the model's"
    else:
        template_source = "none (chat completions answer 400; pass --chat-template)"
    print(_banner(engine, config.served_model_names, args, template_source), flush=True)

    log_level = getattr(args, "log_level", "info")
    server = DrainingServer(
        uvicorn.Config(app, host=args.host, port=args.http_port, log_level=log_level, lifespan="on")
    )
    async_engine.on_dead.append(lambda error: setattr(server, "should_exit", True))
    metrics_server = None
    if args.metrics_port:
        metrics_server, _ = start_http_server(
            args.metrics_port, addr=args.host, registry=app.state.metrics.registry
        )
    try:
        asyncio.run(server.serve())
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
    if async_engine.dead:
        logging.getLogger(__name__).error("exiting: the engine thread failed: %r", async_engine.error)
        return 1
    return 0 if server.started else 1
