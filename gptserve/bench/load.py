"""`gptserve bench load`: a bounded load test of `gptserve serve` on loopback that checks the server keeps
its promises under pressure.

It starts the server (on MODEL, or without one on a tiny random Llama it writes to a temporary
directory), then sends `--num-requests` greedy `/v1/completions` requests with token-id prompts, at most
`--concurrency` at a time: half streamed, half not, and every `--disconnect-every`-th one streamed and
dropped by the client after its first chunk. It passes when:

- no response is a 5xx (nor a transport error);
- every completed output equals its reference, the offline engine's greedy tokens for the same prompt
  (read from the completions' `logprobs.tokens`, which carry token ids on a model without a tokenizer);
- the server's RSS, sampled throughout, stays within `--rss-tolerance` of its value after the warm-up
  (the first `--warmup` requests);
- afterwards `/metrics` shows no running or waiting request and a KV-cache usage of zero.

Figures printed: requests/s, output tokens/s, latency p50/p99, status counts, RSS, load average.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from gptserve.bench.report import write_json
from gptserve.bench.workload import percentile, random_prompts
from gptserve.progress import progress_bar

TINY_LLAMA = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.2,
    bos_token_id=None, eos_token_id=None,
)  # fmt: skip
TOKEN = re.compile(r"<(\d+)>")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--disconnect-every", type=int, default=10, help="every N-th request disconnects")
    parser.add_argument("--num-prompts", type=int, default=64, help="distinct prompts (each has a reference)")
    parser.add_argument("--min-output-len", type=int, default=8)
    parser.add_argument("--max-output-len", type=int, default=32)
    parser.add_argument(
        "--warmup", type=float, default=0.1, help="fraction of requests before RSS is tracked"
    )
    parser.add_argument("--rss-tolerance", type=float, default=0.10)
    parser.add_argument("--server-timeout", type=float, default=300.0, help="seconds to wait for start-up")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the figures here")


def write_tiny_model(path: Path, seed: int = 0) -> Path:
    """A tiny random Llama checkpoint (no tokenizer: prompts and outputs are token ids)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY_LLAMA), dtype=torch.float32)
    model.generation_config.eos_token_id = None
    model.save_pretrained(path)
    return path


def rss_bytes(pid: int) -> int:
    """Resident set size of `pid` (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


@dataclass
class Job:
    index: int
    prompt: list[int]
    max_tokens: int
    stream: bool
    disconnect: bool


@dataclass
class Outcome:
    job: Job
    status: int | None = None  # None = transport error
    tokens: list[int] | None = None
    latency: float = 0.0
    error: str = ""


@dataclass
class LoadReport:
    outcomes: list[Outcome]
    elapsed: float
    rss_samples: list[tuple[int, int]] = field(default_factory=list)  # (requests done, bytes)
    final_metrics: dict[str, float] = field(default_factory=dict)
    mismatches: list[int] = field(default_factory=list)


def _tokens_of(logprobs: dict[str, Any] | None) -> list[int]:
    return [
        int(TOKEN.fullmatch(t).group(1)) for t in (logprobs or {}).get("tokens", []) if TOKEN.fullmatch(t)
    ]


async def _send(http: httpx.AsyncClient, job: Job) -> Outcome:
    body = {"prompt": job.prompt, "max_tokens": job.max_tokens, "temperature": 0, "ignore_eos": True,
            "logprobs": 0, "stream": job.stream}  # fmt: skip
    outcome = Outcome(job)
    start = time.monotonic()
    try:
        if not job.stream:
            r = await http.post("/v1/completions", json=body)
            outcome.status = r.status_code
            if r.status_code == 200:
                outcome.tokens = _tokens_of(r.json()["choices"][0]["logprobs"])
            else:
                outcome.error = r.text[:300]
        else:
            async with http.stream("POST", "/v1/completions", json=body) as r:
                outcome.status = r.status_code
                tokens: list[int] = []
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    payload = json.loads(line[6:])
                    if "error" in payload:
                        outcome.error = str(payload["error"])[:300]
                        outcome.status = payload["error"].get("code") or 500
                        break
                    tokens += _tokens_of(payload["choices"][0]["logprobs"])
                    if job.disconnect and tokens:
                        break  # leaving the block closes the connection mid-stream
                outcome.tokens = None if job.disconnect else tokens
    except httpx.HTTPError as e:
        outcome.status, outcome.error = None, f"{type(e).__name__}: {e}"
    outcome.latency = time.monotonic() - start
    return outcome


def parse_metrics(text: str) -> dict[str, float]:
    """The unlabelled-by-reason gauges of `/metrics` this test reads."""
    out = {}
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        match = re.search(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$", text, re.M)
        if match:
            out[name] = float(match.group(1))
    return out


async def drive(url: str, pid: int, jobs: list[Job], concurrency: int, warmup: int) -> LoadReport:
    """Send `jobs` with at most `concurrency` in flight, sampling the server's RSS as they complete (and
    counting them on a progress bar)."""
    outcomes: list[Outcome] = []
    samples: list[tuple[int, int]] = []
    queue: asyncio.Queue[Job] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        with progress_bar(len(jobs), "load", "req") as bar:

            async def worker() -> None:
                while not queue.empty():
                    outcomes.append(await _send(http, queue.get_nowait()))
                    bar.update(1)

            async def sampler() -> None:
                while True:
                    samples.append((len(outcomes), rss_bytes(pid)))
                    await asyncio.sleep(0.25)

            watch = asyncio.create_task(sampler())
            start = time.monotonic()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.monotonic() - start
            watch.cancel()
        samples.append((len(outcomes), rss_bytes(pid)))
        deadline = time.monotonic() + 30
        while True:  # aborted requests are freed by the engine's next iteration
            metrics = parse_metrics((await http.get("/metrics")).text)
            if not any(metrics.values()) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
    return LoadReport(outcomes, elapsed, [s for s in samples if s[0] >= warmup], metrics)


def make_jobs(args: argparse.Namespace, vocab: int) -> tuple[list[Job], list[list[int]], list[int]]:
    prompts = random_prompts(args.num_prompts, 4, 48, vocab, seed=0)
    lens = [args.min_output_len + (i * 7) % (args.max_output_len - args.min_output_len + 1)
            for i in range(args.num_prompts)]  # fmt: skip
    jobs = []
    for i in range(args.num_requests):
        p = i % args.num_prompts
        disconnect = args.disconnect_every > 0 and i % args.disconnect_every == args.disconnect_every - 1
        jobs.append(Job(i, prompts[p], lens[p], stream=disconnect or i % 2 == 0, disconnect=disconnect))
    return jobs, prompts, lens


def references(model: str, options: Any, prompts: list[list[int]], lens: list[int]) -> list[list[int]]:
    """The offline engine's greedy tokens for every prompt (no HTTP)."""
    from gptserve.llm import LLM
    from gptserve.sampling_params import SamplingParams

    llm = LLM(model, **vars(options))
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lens]
    outs = llm.generate(prompts, params, use_tqdm=True)
    return [list(o.outputs[0].token_ids) for o in outs]


def check(report: LoadReport, refs: list[list[int]], num_prompts: int, tolerance: float) -> list[str]:
    """Every failed promise, in words (empty = pass)."""
    failures = []
    statuses = Counter(o.status for o in report.outcomes)
    bad = {s: n for s, n in statuses.items() if not isinstance(s, int) or s >= 500}
    if bad:
        errors = [o.error for o in report.outcomes if o.status in bad][:3]
        failures.append(f"5xx or transport errors: {bad}; first: {errors}")
    for o in report.outcomes:
        if o.status == 200 and o.tokens is not None and o.tokens != refs[o.job.index % num_prompts]:
            report.mismatches.append(o.job.index)
    if report.mismatches:
        failures.append(
            f"{len(report.mismatches)} outputs differ from their reference: {report.mismatches[:10]}"
        )
    if report.rss_samples:
        base = report.rss_samples[0][1]
        peak = max(b for _, b in report.rss_samples)
        if peak > base * (1 + tolerance):
            failures.append(f"RSS grew from {base / 2**20:.1f} MiB to {peak / 2**20:.1f} MiB after warm-up")
    leftover = {k: v for k, v in report.final_metrics.items() if v}
    if leftover or len(report.final_metrics) < 3:
        failures.append(f"the server did not return to idle: {report.final_metrics}")
    return failures


def summary(report: LoadReport, jobs: list[Job]) -> dict[str, Any]:
    done = [o for o in report.outcomes if o.status == 200 and o.tokens is not None]
    latencies = [o.latency for o in done]
    rss = [b for _, b in report.rss_samples] or [0]
    return {
        "requests": len(report.outcomes),
        "completed": len(done),
        "disconnected": sum(1 for j in jobs if j.disconnect),
        "statuses": {
            str(k): v for k, v in sorted(Counter(o.status for o in report.outcomes).items(), key=str)
        },
        "elapsed_s": round(report.elapsed, 2),
        "requests_per_s": round(len(report.outcomes) / report.elapsed, 1),
        "output_tokens_per_s": round(sum(len(o.tokens or []) for o in done) / report.elapsed, 1),
        "latency_p50_s": round(percentile(latencies, 50), 3) if latencies else None,
        "latency_p99_s": round(percentile(latencies, 99), 3) if latencies else None,
        "outputs_checked": len(done),
        "mismatches": len(report.mismatches),
        "rss_after_warmup_mib": round(rss[0] / 2**20, 1),
        "rss_peak_mib": round(max(rss) / 2**20, 1),
        "rss_end_mib": round(rss[-1] / 2**20, 1),
        "rss_growth_pct": round(100 * (max(rss) / rss[0] - 1), 2) if rss[0] else None,
        "final_metrics": report.final_metrics,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def run(args: argparse.Namespace) -> int:
    from gptserve.bench.serve import engine_flags, running_server_process
    from gptserve.cli import engine_options

    with tempfile.TemporaryDirectory(prefix="gptserve-load-") as tmp:
        if args.model is None:
            args.model = str(write_tiny_model(Path(tmp) / "tiny-llama"))
            args.dtype = "fp32" if args.dtype == "auto" else args.dtype
            args.max_model_len = args.max_model_len or 128
        options = engine_options(args)
        jobs, prompts, lens = make_jobs(args, vocab=_vocab(args.model))
        refs = references(args.model, options, prompts, lens)
        with running_server_process(engine_flags(args), args.server_timeout) as (url, process):
            warmup = int(args.warmup * args.num_requests)
            report = asyncio.run(drive(url, process.pid, jobs, args.concurrency, warmup))
    failures = check(report, refs, args.num_prompts, args.rss_tolerance)
    figures = summary(report, jobs)
    figures["passed"] = not failures
    for key, value in figures.items():
        print(f"{key:<22} {value}")
    for failure in failures:
        print(f"FAIL: {failure}")
    if args.json:
        write_json(args.json, figures)
    return 0 if not failures else 1


def _vocab(model: str) -> int:
    with contextlib.suppress(OSError, ValueError, KeyError):
        return int(json.loads((Path(model) / "config.json").read_text())["vocab_size"])
    return 512
