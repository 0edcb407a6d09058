"""`gptserve client`: send a batch of prompts to a server and print the answers; the useful form of
FasterTransformer's `end_to_end_test.py`.

Prompts come from the arguments, `--file` (one per line, or JSON Lines) or standard input. Each prompt is
one request; `--concurrency` requests are in flight at once. Over `--protocol http` and `grpc` the
client speaks Triton's KServe v2 to the model's text form, FasterTransformer's ensemble or its token
form, whichever the model has; over `openai` it uses `/v1/completions` (`--chat`: chat completions), and
`--json-schema FILE` constrains every answer to JSON that the file's schema accepts.
Exit status: 0 when every request succeeded, 1 when some failed (each failure is printed with the
server's message), 2 when the run could not start.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

DEFAULT_URLS = {
    "http": "http://127.0.0.1:8000",
    "grpc": "127.0.0.1:8001",
    "openai": "http://127.0.0.1:8000/v1",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "client",
        help="send a batch of prompts to a server (OpenAI, Triton HTTP or gRPC) and print the answers",
        description="Send prompts to a running server and print the answers as a table or JSON.",
    )
    p.add_argument("prompt", nargs="*", help="prompts (else --file, else standard input)")
    p.add_argument("-f", "--file", help='prompts, one per line, or JSON Lines ({"prompt": ...}); - = stdin')
    p.add_argument(
        "-i",
        "--protocol",
        choices=["http", "grpc", "openai"],
        default="http",
        help="Triton KServe v2 over HTTP or gRPC, or the OpenAI API (default http)",
    )
    p.add_argument("-u", "--url", help="server address (default: 127.0.0.1:8000, gRPC 127.0.0.1:8001)")
    p.add_argument("-m", "--model", help="model name (default: the server's first text model)")
    p.add_argument("--api-key", default=None, help="API key (default: $GPTSERVE_API_KEY)")
    p.add_argument("--http-url", help="gRPC only: the server's HTTP address, to tokenize bad/stop words")
    p.add_argument("--chat", action="store_true", help="openai only: send each prompt as a chat message")
    p.add_argument(
        "--json-schema",
        metavar="FILE",
        help="openai only: every answer is JSON that this file's JSON schema accepts (sent as "
        "response_format with --chat, else as guided_json)",
    )
    p.add_argument(
        "--stream", action="store_true", help="stream the answers (and measure time to first text)"
    )
    p.add_argument("--max-tokens", "--output-len", type=int, default=64, help="tokens to generate (64)")
    p.add_argument("--beam-width", "-beam", type=int, default=1, help="beam search width (Triton protocols)")
    p.add_argument("--top-k", "-topk", type=int, default=None)
    p.add_argument("--top-p", "-topp", type=float, default=None)
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="sampling temperature; with none of it, top-k and top-p, decoding is greedy",
    )
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--bad-words",
        action="append",
        default=[],
        metavar="WORD",
        help="a word never to generate (repeatable)",
    )
    p.add_argument(
        "--stop-words",
        action="append",
        default=[],
        metavar="WORD",
        help="a word that ends the answer (repeatable)",
    )
    p.add_argument("-c", "--concurrency", type=int, default=4, help="requests in flight at once (4)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for one request (600)")


def _read_schema(path: str) -> dict:
    """The JSON schema in the file at `path`; a `GptServeError` saying what is wrong with it."""
    from gptserve.errors import GptServeError

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or e
        raise GptServeError(f"--json-schema: cannot read {path}: {reason}") from None
    try:
        schema = json.loads(text)
    except ValueError as e:
        raise GptServeError(f"--json-schema: {path} is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise GptServeError(f"--json-schema: {path} is not a JSON schema (a JSON object)")
    return schema


def _options(args: argparse.Namespace):
    from gptserve.client.types import Options

    schema = None if args.json_schema is None else _read_schema(args.json_schema)
    return Options(
        max_tokens=args.max_tokens,
        beam_width=args.beam_width,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        bad_words=args.bad_words,
        stop_words=args.stop_words,
        stream=args.stream,
        json_schema=schema,
        json_schema_name=Path(args.json_schema).stem if args.json_schema else "schema",
    )


def _check(args: argparse.Namespace) -> None:
    from gptserve.errors import GptServeError

    if args.max_tokens < 1 or args.beam_width < 1 or args.concurrency < 1:
        raise GptServeError("--max-tokens, --beam-width and --concurrency must be at least 1")
    if args.chat and args.protocol != "openai":
        raise GptServeError("--chat needs --protocol openai (Triton's text form has no chat template)")
    if args.beam_width > 1 and args.protocol == "openai":
        raise GptServeError("beam search is not part of the OpenAI protocol: use --protocol http or grpc")
    if args.json_schema and args.protocol != "openai":
        raise GptServeError(
            "--json-schema needs --protocol openai (Triton's protocols have no structured-output field)"
        )
    if args.http_url and args.protocol != "grpc":
        raise GptServeError("--http-url is for --protocol grpc")


def run(args: argparse.Namespace) -> int:
    from gptserve.client.openai_client import OpenAIClient
    from gptserve.client.prompts import read_prompts
    from gptserve.client.report import as_json, summary, table
    from gptserve.client.triton_client import TritonClient
    from gptserve.client.types import ClientError, Result
    from gptserve.progress import progress_bar

    _check(args)
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    prompts = read_prompts(args.prompt, args.file, sys.stdin)
    options = _options(args)
    api_key = args.api_key or os.environ.get("GPTSERVE_API_KEY") or None
    url = args.url or DEFAULT_URLS[args.protocol]
    if args.protocol == "openai":
        client = OpenAIClient(url, api_key, args.model, args.timeout)

        def send(index, prompt, on_text=None):
            return client.generate(index, prompt, options, args.chat, on_text)
    else:
        client = TritonClient(args.protocol, url, api_key, args.model, args.http_url, args.timeout)

        def send(index, prompt, on_text=None):
            return client.generate(index, prompt, options, on_text)

    live = args.stream and args.concurrency == 1 and not args.json
    try:
        model = client.model  # resolves the model (and reaches the server) before any request
        results: list[Result] = []
        start = time.perf_counter()

        def one(index: int, prompt) -> Result:
            try:
                if live:
                    sys.stdout.write(f"[{index}] {prompt}\n")
                    result = send(index, prompt, lambda text: (sys.stdout.write(text), sys.stdout.flush()))
                    sys.stdout.write("\n\n")
                    return result
                return send(index, prompt)
            except ClientError as e:
                return Result(index, prompt, error=str(e))

        bar_options = {"disable": True} if live else {}  # the answers themselves show the progress
        with (
            ThreadPoolExecutor(max_workers=args.concurrency) as pool,
            progress_bar(len(prompts), f"{args.protocol} {model}", "req", **bar_options) as bar,
        ):
            futures = [pool.submit(one, i, p) for i, p in enumerate(prompts, 1)]
            try:
                for future in as_completed(futures):
                    results.append(future.result())
                    bar.update(1)
            except KeyboardInterrupt:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
        wall = time.perf_counter() - start
    finally:
        client.close()
    results.sort(key=lambda r: r.index)
    if args.json:
        print(as_json(results, model, args.protocol, wall))
    else:
        if not live:
            print(table(results))
        print(summary(results, wall))
    for r in results:
        if r.error:
            print(f"gptserve client: error: prompt {r.index}: {r.error}", file=sys.stderr)
    return 1 if any(r.error for r in results) else 0
