"""`gptserve bench serve`: the HTTP server under concurrent streaming clients, next to the offline engine.

In one run: the offline engine generates for a fixed random prompt set (`run_offline`, no HTTP); then a
`gptserve serve` process with the same engine flags starts on a free loopback port and is driven at each
concurrency level by streaming `/v1/completions` clients (token-id prompts, greedy, `ignore_eos`, so
every request makes exactly `--output-len` tokens). It reports TTFT, inter-token latency (gaps between
streamed chunks), time per output token, end-to-end latency (p50/p99) and output tokens/s per level,
and the server's throughput at the highest concurrency as a fraction of the offline engine's. The
offline run caps its batch at that concurrency, so both keep the same number of sequences in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from gptserve.bench.report import print_table, write_json
from gptserve.bench.workload import percentile, random_prompts
from gptserve.progress import progress_bar
from gptserve.sampling_params import SamplingParams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--num-prompts", type=int, default=0, help="requests per level; 0 = twice the concurrency (min 4)"
    )
    parser.add_argument("--min-input-len", type=int, default=32)
    parser.add_argument("--max-input-len", type=int, default=96)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-baseline", action="store_true", help="skip the offline engine run")
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--json", default=None, help="also write the figures to this file")


@dataclass
class RequestResult:
    ttft: float
    e2e: float
    output_tokens: int
    chunk_gaps: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


async def _one_request(http: httpx.AsyncClient, url: str, body: dict[str, Any]) -> RequestResult:
    start = time.perf_counter()
    first: float | None = None
    last = start
    gaps: list[float] = []
    tokens = 0
    async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"server answered {r.status_code}: {(await r.aread()).decode()[:500]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"server error mid-stream: {chunk['error']}")
            now = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if not chunk.get("choices"):
                continue
            if first is None:
                first = now
            else:
                gaps.append(now - last)
            last = now
    end = time.perf_counter()
    return RequestResult((first or end) - start, end - start, tokens, gaps)


async def drive(
    url: str, prompts: list[list[int]], concurrency: int, output_len: int, desc: str | None = None
) -> dict[str, Any]:
    """Send every prompt with at most `concurrency` streams open; latency percentiles and throughput.
    With `desc`, a progress bar so labelled counts the completed requests."""
    body = {"prompt": None, "max_tokens": output_len, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    queue: asyncio.Queue[list[int]] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    results: list[RequestResult] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    bar_options = {} if desc else {"disable": True}
    with progress_bar(len(prompts), desc, "req", **bar_options) as bar:
        async with httpx.AsyncClient(timeout=None, limits=limits) as http:

            async def worker() -> None:
                while not queue.empty():
                    prompt = queue.get_nowait()
                    results.append(await _one_request(http, url, {**body, "prompt": prompt}))
                    bar.update(1)

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            wall = time.perf_counter() - start
    tokens = sum(r.output_tokens for r in results)
    gaps = [g for r in results for g in r.chunk_gaps]
    tpots = [t for r in results if (t := r.tpot) is not None]
    ms = 1000.0

    def pct(values: list[float], q: float) -> float:
        return percentile(values, q) * ms

    return {
        "concurrency": concurrency, "requests": len(results), "seconds": wall, "output_tokens": tokens,
        "output_tokens_per_s": tokens / wall,
        "ttft_ms_p50": pct([r.ttft for r in results], 50), "ttft_ms_p99": pct([r.ttft for r in results], 99),
        "itl_ms_p50": pct(gaps, 50), "itl_ms_p99": pct(gaps, 99),
        "tpot_ms_p50": pct(tpots, 50), "tpot_ms_p99": pct(tpots, 99),
        "e2e_ms_p50": pct([r.e2e for r in results], 50), "e2e_ms_p99": pct([r.e2e for r in results], 99),
    }  # fmt: skip


def engine_flags(args: argparse.Namespace) -> list[str]:
    """The engine flags the user gave, as `gptserve serve` arguments (the server gets the same engine)."""
    from gptserve.cli import add_engine_args

    parser = argparse.ArgumentParser(add_help=False)
    add_engine_args(parser)
    flags = [str(args.model)] if args.model else []
    for dest, default in vars(parser.parse_args([])).items():
        value = getattr(args, dest, default)
        if dest == "model" or value == default:
            continue
        flag = "--" + dest.replace("_", "-")
        if isinstance(value, bool):
            flags += [flag] if value else []
        else:
            flags += [flag, str(value)]
    return flags


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(flags: list[str], timeout: float) -> Iterator[str]:
    """A `gptserve serve` process on a free loopback port; yields its URL, stops it with SIGTERM."""
    with running_server_process(flags, timeout) as (url, _):
        yield url


@contextlib.contextmanager
def running_server_process(flags: list[str], timeout: float) -> Iterator[tuple[str, subprocess.Popen]]:
    """As `running_server`, yielding the URL and the process."""
    port = _free_port()
    cmd = [sys.executable, "-m", "gptserve.cli", "serve", *flags, "--host", "127.0.0.1",
           "--http-port", str(port), "--metrics-port", "0", "--grpc-port", "0"]  # fmt: skip
    with tempfile.TemporaryFile(mode="w+") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"the server exited with {process.returncode}:\n{log.read()[-3000:]}")
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server was not healthy within {timeout:.0f} s")
                time.sleep(0.5)
            yield url, process
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def offline_baseline(args: argparse.Namespace, prompts: list[list[int]], max_seqs: int) -> dict[str, Any]:
    from gptserve.bench.throughput import run_offline
    from gptserve.cli import engine_options
    from gptserve.llm import LLM

    options = vars(engine_options(args))
    options["max_num_seqs"] = min(options["max_num_seqs"], max_seqs)
    llm = LLM(args.model, **options)
    warm = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    run_offline(llm, prompts[:2], warm)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    result = run_offline(llm, prompts, params, progress=True)
    del llm
    gc.collect()
    return result


def _vocab_size(args: argparse.Namespace) -> int:
    from gptserve.config import ModelConfig
    from gptserve.loading.loader import load_checkpoint

    return ModelConfig.from_hf(load_checkpoint(args.model).hf_config).vocab_size


def run(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would bury the table
    levels = sorted(set(args.concurrency))
    per_level = {c: args.num_prompts or max(2 * c, 4) for c in levels}
    prompts = random_prompts(
        max(per_level.values()), args.min_input_len, args.max_input_len, _vocab_size(args), args.seed
    )
    top = levels[-1]
    results: dict[str, Any] = {"levels": [], "load_average_before": os.getloadavg()[0]}
    if not args.no_baseline:
        results["offline"] = offline_baseline(args, prompts[: per_level[top]], top)
    with running_server(engine_flags(args), args.startup_timeout) as url:
        asyncio.run(drive(url, prompts[:2], 2, 4))  # warm-up
        for c in levels:
            level = drive(url, prompts[: per_level[c]], c, args.output_len, desc=f"serve c={c}")
            results["levels"].append(asyncio.run(level))
    # Other processes on the machine skew every figure here; the load average says whether there were any.
    results["load_average_after"] = os.getloadavg()[0]
    rows = [
        ("workload", f"prompts of {args.min_input_len}-{args.max_input_len} tokens (seed {args.seed}), "
                     f"{args.output_len} output tokens each, greedy, streamed"),
    ]  # fmt: skip
    for r in results["levels"]:
        rows.append((
            f"serve c={r['concurrency']} ({r['requests']} req)",
            f"{r['output_tokens_per_s']:7.1f} tok/s | "
            f"TTFT {r['ttft_ms_p50']:.0f}/{r['ttft_ms_p99']:.0f} ms | "
            f"ITL {r['itl_ms_p50']:.0f}/{r['itl_ms_p99']:.0f} ms | TPOT {r['tpot_ms_p50']:.0f}/"
            f"{r['tpot_ms_p99']:.0f} ms | E2E {r['e2e_ms_p50']:.0f}/{r['e2e_ms_p99']:.0f} ms (p50/p99)",
        ))  # fmt: skip
    if "offline" in results:
        off = results["offline"]
        served = results["levels"][-1]["output_tokens_per_s"]
        results["serve_over_offline"] = served / off["output_tokens_per_s"]
        rows.append((f"offline engine ({off['requests']} req, <= {top} seqs)",
                     f"{off['output_tokens_per_s']:7.1f} tok/s ({off['seconds']:.1f} s)"))  # fmt: skip
        rows.append((f"serve c={top} / offline", f"{results['serve_over_offline']:.1%}"))
    rows.append((
        "1-min load average",
        f"{results['load_average_before']:.2f} before, {results['load_average_after']:.2f} after "
        f"({os.cpu_count()} CPUs)",
    ))  # fmt: skip
    print_table("bench serve", rows)
    write_json(args.json, results)
    return 0
