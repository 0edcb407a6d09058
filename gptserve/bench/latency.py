"""`gptserve bench latency`: one request at a time: time to first token, ms per decode step, tokens/s,
achieved weight bandwidth against the measured copy bandwidth, and Hugging Face in the same run."""

from __future__ import annotations

import argparse
import time
from typing import Any

from gptserve.bench.hardware import copy_bandwidth, decode_weight_bytes
from gptserve.bench.hf_baseline import hf_generate_time, load_hf_model
from gptserve.bench.report import gb, print_table, write_json
from gptserve.bench.workload import median, random_prompts
from gptserve.config import parse_dtype
from gptserve.llm import LLM
from gptserve.sampling_params import SamplingParams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-len", type=int, default=100)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", choices=["none", "hf"], default="none")
    parser.add_argument("--baseline-dtypes", default="fp32,bf16", help="dtypes of the HF baseline runs")
    parser.add_argument("--json", default=None, help="also write the figures to this file")


def measure_request(llm: LLM, prompt: list[int], output_len: int) -> tuple[float, float]:
    """(seconds to the first token, seconds per later token) for one request alone in the engine."""
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    request_id = f"latency-{time.monotonic_ns()}"
    start = time.perf_counter()
    engine.add_request(request_id, prompt, params)
    first = None
    while engine.has_unfinished_requests():
        engine.step()
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return first - start, (end - first) / max(output_len - 1, 1)


def run(args: argparse.Namespace, llm: LLM) -> int:
    device = llm.engine.config.device
    prompt = random_prompts(1, args.input_len, args.input_len, llm.engine.model_config.vocab_size)[0]
    measure_request(llm, prompt, 8)  # warm-up
    runs = [measure_request(llm, prompt, args.output_len) for _ in range(args.repeats)]
    ttft = median([r[0] for r in runs])
    step = median([r[1] for r in runs])
    total = ttft + step * (args.output_len - 1)
    weight_bytes = decode_weight_bytes(llm.engine.runner.model)
    bandwidth = copy_bandwidth(device)
    achieved = weight_bytes / step
    results: dict[str, Any] = {
        "ttft_s": ttft,
        "decode_ms_per_token": step * 1e3,
        "tokens_per_s": args.output_len / total,
        "weight_bytes_per_step": weight_bytes,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "achieved_bandwidth_fraction": achieved / bandwidth,
        "roofline_ms_per_token": weight_bytes / bandwidth * 1e3,
    }
    rows = [
        (
            "workload",
            f"1 request, {args.input_len} prompt + {args.output_len} new tokens, median of {args.repeats}",
        ),
        ("copy bandwidth (measured)", gb(bandwidth)),
        ("weights read per step", f"{weight_bytes / 1e6:.1f} MB"),
        ("roofline", f"{results['roofline_ms_per_token']:.2f} ms/token"),
        ("gptserve TTFT", f"{ttft * 1e3:.1f} ms"),
        ("gptserve decode", f"{step * 1e3:.2f} ms/token ({1 / step:.1f} tok/s)"),
        ("gptserve end to end", f"{results['tokens_per_s']:.1f} tok/s"),
        ("achieved bandwidth", f"{gb(achieved)} = {achieved / bandwidth:.0%} of copy bandwidth"),
    ]
    if args.baseline == "hf":
        for name in args.baseline_dtypes.split(","):
            dtype = parse_dtype(name.strip())
            net = load_hf_model(args.model, dtype, device)
            hf_generate_time(net, [prompt], 4)  # warm-up
            hf_ttft = median([hf_generate_time(net, [prompt], 1) for _ in range(args.repeats)])
            hf_total = median([hf_generate_time(net, [prompt], args.output_len) for _ in range(args.repeats)])
            rate = args.output_len / hf_total
            results[f"hf_{name}"] = {"ttft_s": hf_ttft, "tokens_per_s": rate}
            rows.append((f"HF generate {name}", f"TTFT {hf_ttft * 1e3:.1f} ms, {rate:.1f} tok/s end to end"))
            rows.append((f"  gptserve / HF {name}", f"{results['tokens_per_s'] / rate:.2f}x"))
            del net
    print_table("bench latency", rows)
    write_json(args.json, results)
    return 0
