"""`gptserve bench latency`: one request at a time: time to first token, ms per decode step, tokens/s,
achieved weight bandwidth against the measured copy bandwidth, and Hugging Face in the same run."""

from __future__ import annotations

import argparse
import time
from typing import Any

from gptserve.bench.hardware import copy_bandwidth, decode_weight_bytes, matmul_rate
from gptserve.bench.hf_baseline import add_baseline_arguments, baseline_model, hf_generate_time
from gptserve.bench.kernel_profile import profile_engine_steps
from gptserve.bench.report import gb, print_table, write_json
from gptserve.bench.workload import median, random_prompts
from gptserve.config import parse_dtype
from gptserve.llm import LLM
from gptserve.progress import progress_bar
from gptserve.sampling_params import SamplingParams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-len", type=int, default=100)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    add_baseline_arguments(parser)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after the timed runs, profile one more request and show its device time per step by kind "
        "(matmul, attention, communication, other)",
    )
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
    dtype = llm.engine.config.dtype
    # A fresh prompt per run (warm-up included), so no run reuses another's cached prefix.
    prompts = random_prompts(
        args.repeats + 1, args.input_len, args.input_len, llm.engine.model_config.vocab_size
    )
    measure_request(llm, prompts[-1], 8)  # warm-up
    runs = []
    with progress_bar(args.repeats, "latency", "run") as bar:
        for prompt in prompts[: args.repeats]:
            runs.append(measure_request(llm, prompt, args.output_len))
            bar.update(1)
    ttft = median([r[0] for r in runs])
    step = median([r[1] for r in runs])
    total = ttft + step * (args.output_len - 1)
    weight_bytes = decode_weight_bytes(llm.engine.runner.model)
    bandwidth = copy_bandwidth(device)
    flops = matmul_rate(device, dtype)
    achieved = weight_bytes / step
    results: dict[str, Any] = {
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "ttft_s": ttft,
        "decode_ms_per_token": step * 1e3,
        "tokens_per_s": args.output_len / total,
        "weight_bytes_per_step": weight_bytes,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "matmul_flops_per_s": flops,
        "achieved_bandwidth_fraction": achieved / bandwidth,
        "roofline_ms_per_token": weight_bytes / bandwidth * 1e3,
        # Prefill reads the weights once and does 2 FLOPs per weight and prompt token.
        "roofline_ttft_s": max(
            weight_bytes / bandwidth, weight_bytes / dtype.itemsize * 2 * args.input_len / flops
        ),
    }
    rows = [
        (
            "workload",
            f"1 request, {args.input_len} prompt + {args.output_len} new tokens, median of {args.repeats}",
        ),
        ("device", f"{_device_name(device)}, {results['dtype']}"),
        ("copy bandwidth (measured)", gb(bandwidth)),
        ("matmul rate (measured)", f"{flops / 1e12:.1f} TFLOP/s ({results['dtype']})"),
        ("weights read per step", f"{weight_bytes / 1e6:.1f} MB"),
        ("roofline", f"{results['roofline_ms_per_token']:.2f} ms/token, "
                     f"TTFT {results['roofline_ttft_s'] * 1e3:.2f} ms"),  # fmt: skip
        ("gptserve TTFT", f"{ttft * 1e3:.1f} ms"),
        ("gptserve decode", f"{step * 1e3:.2f} ms/token ({1 / step:.1f} tok/s)"),
        ("gptserve end to end",
         f"{results['tokens_per_s']:.1f} tok/s ({total / args.output_len * 1e3:.2f} ms/token)"),
        ("achieved bandwidth", f"{gb(achieved)} = {achieved / bandwidth:.0%} of copy bandwidth"),
    ]  # fmt: skip
    if args.profile:
        profile = profile_engine_steps(llm.engine, lambda: measure_request(llm, prompts[0], args.output_len))
        rows += profile.rows()
        results["profile"] = profile.as_dict()
    if args.baseline == "hf":
        llm.close()  # its KV cache and graphs go back before the baseline loads (the weights stay)
        prompt = prompts[0]
        for name in args.baseline_dtypes.split(","):
            net = baseline_model(args, parse_dtype(name.strip()), device)
            hf_generate_time(net, [prompt], 4)  # warm-up
            hf_ttft = median([hf_generate_time(net, [prompt], 1) for _ in range(args.repeats)])
            hf_total = median([hf_generate_time(net, [prompt], args.output_len) for _ in range(args.repeats)])
            hf_step = (hf_total - hf_ttft) / max(args.output_len - 1, 1)
            rate = args.output_len / hf_total
            results[f"hf_{name}"] = {
                "ttft_s": hf_ttft,
                "decode_ms_per_token": hf_step * 1e3,
                "tokens_per_s": rate,
            }
            rows.append((f"HF generate {name}",
                         f"TTFT {hf_ttft * 1e3:.1f} ms, decode {hf_step * 1e3:.2f} ms/token, "
                         f"{rate:.1f} tok/s end to end"))  # fmt: skip
            rows.append((f"  gptserve / HF {name}", f"{results['tokens_per_s'] / rate:.2f}x end to end"))
            if args.baseline_static:
                _static_baseline(args, net, prompt, name, results, rows)
            del net
    print_table("bench latency", rows)
    write_json(args.json, results)
    return 0


def _static_baseline(
    args: argparse.Namespace,
    net: Any,
    prompt: list[int],
    name: str,
    results: dict[str, Any],
    rows: list[tuple[str, str]],
) -> None:
    """HF `generate` with a static cache, which transformers compiles; the first call (compilation and
    graph capture) is timed apart from the median of the repeats."""
    key = f"hf_{name}_static"
    try:
        start = time.perf_counter()
        hf_generate_time(net, [prompt], args.output_len, cache_implementation="static")
        hf_generate_time(net, [prompt], args.output_len, cache_implementation="static")
        warm = time.perf_counter() - start
        total = median(
            [
                hf_generate_time(net, [prompt], args.output_len, cache_implementation="static")
                for _ in range(args.repeats)
            ]
        )
    except Exception as e:  # a transformers version or model that cannot compile: report it
        results[key] = {"error": f"{type(e).__name__}: {e}"}
        rows.append((f"HF generate {name} static", f"failed: {type(e).__name__}: {str(e)[:200]}"))
        return
    rate = args.output_len / total
    results[key] = {"tokens_per_s": rate, "ms_per_token": total / args.output_len * 1e3, "warm_up_s": warm}
    rows.append((f"HF generate {name} static",
                 f"{total / args.output_len * 1e3:.2f} ms/token end to end "
                 f"({rate:.1f} tok/s; first two calls {warm:.0f} s)"))  # fmt: skip
    rows.append((f"  gptserve / HF {name} static", f"{results['tokens_per_s'] / rate:.2f}x end to end"))


def _device_name(device: Any) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
