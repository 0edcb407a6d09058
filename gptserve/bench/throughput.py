"""`gptserve bench throughput`: offline generation of a batch of prompts, output tokens per second,
next to Hugging Face `generate` on the same prompts in the same process."""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

from gptserve.bench.hardware import copy_bandwidth, decode_weight_bytes, matmul_rate
from gptserve.bench.hf_baseline import (
    add_baseline_arguments,
    baseline_model,
    hf_batches_time,
    hf_generate_time,
)
from gptserve.bench.kernel_profile import profile_engine_steps
from gptserve.bench.report import gb, print_table, write_json
from gptserve.bench.workload import random_prompts
from gptserve.config import parse_dtype
from gptserve.engine.kv_budget import kv_bytes_per_token
from gptserve.llm import LLM
from gptserve.sampling_params import SamplingParams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--min-input-len", type=int, default=60)
    parser.add_argument("--max-input-len", type=int, default=140)
    parser.add_argument("--output-len", type=int, default=128)
    add_baseline_arguments(parser)
    parser.add_argument(
        "--baseline-batch", type=int, default=0, help="HF generate batch size; 0 = all prompts in one batch"
    )
    parser.add_argument(
        "--baseline-num-prompts", type=int, default=0, help="HF runs the first N prompts only; 0 = all"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after the timed run, profile the first --max-num-seqs prompts again and show the device "
        "time per step by kind (matmul, attention, communication, other); with prefix caching on, their "
        "prompts come from the cache, so the profile shows decode steps",
    )
    parser.add_argument("--json", default=None, help="also write the figures to this file")


def run_offline(
    llm: LLM, prompts: list[list[int]], params: SamplingParams, progress: bool = False
) -> dict[str, Any]:
    """Generate for every prompt at once through the engine; time and count the output tokens.
    `progress` shows a bar over finished requests."""
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=progress)
    elapsed = time.perf_counter() - start
    generated = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    prompt_tokens = sum(len(p) for p in prompts)
    return {
        "seconds": elapsed,
        "requests": len(prompts),
        "output_tokens": generated,
        "output_tokens_per_s": generated / elapsed,
        "total_tokens_per_s": (generated + prompt_tokens) / elapsed,
    }


def roofline(llm: LLM, prompts: list[list[int]], output_len: int, bandwidth: float, flops: float) -> float:
    """Fewest seconds the workload can take on this machine: the weights read once per decode step of
    full batches, every cached token read once per step that attends to it, 2 FLOPs per weight and token;
    the larger of the byte time and the FLOP time."""
    engine = llm.engine
    weight_bytes = decode_weight_bytes(engine.runner.model)
    batch = engine.config.scheduler.max_num_seqs
    steps = math.ceil(len(prompts) / batch) * output_len
    kv_token = kv_bytes_per_token(engine.model_config, engine.config.cache.dtype or engine.config.dtype)
    kv_reads = sum(output_len * len(p) + output_len * (output_len - 1) // 2 for p in prompts) * kv_token
    tokens = sum(len(p) for p in prompts) + len(prompts) * output_len
    byte_time = (steps * weight_bytes + kv_reads) / bandwidth
    flop_time = 2 * weight_bytes / engine.config.dtype.itemsize * tokens / flops
    return max(byte_time, flop_time)


def run(args: argparse.Namespace, llm: LLM) -> int:
    device = llm.engine.config.device
    vocab = llm.engine.model_config.vocab_size
    prompts = random_prompts(args.num_prompts, args.min_input_len, args.max_input_len, vocab)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    warm = random_prompts(2, args.min_input_len, args.max_input_len, vocab, seed=1)
    run_offline(llm, warm, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))  # warm-up
    ours = run_offline(llm, prompts, params, progress=True)
    bandwidth = copy_bandwidth(device)
    flops = matmul_rate(device, llm.engine.config.dtype)
    floor = roofline(llm, prompts, args.output_len, bandwidth, flops)
    ours["roofline_output_tokens_per_s"] = ours["output_tokens"] / floor
    results: dict[str, Any] = {
        "gptserve": ours,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "matmul_flops_per_s": flops,
        "max_num_seqs": llm.engine.config.scheduler.max_num_seqs,
    }
    rows = [
        (
            "workload",
            f"{len(prompts)} prompts of {args.min_input_len}-{args.max_input_len} tokens, "
            f"{args.output_len} new tokens each, <= {results['max_num_seqs']} sequences at once",
        ),
        ("copy bandwidth (measured)", gb(bandwidth)),
        ("matmul rate (measured)", f"{flops / 1e12:.1f} TFLOP/s"),
        ("roofline", f"{ours['roofline_output_tokens_per_s']:.1f} output tok/s ({floor:.2f} s)"),
        ("gptserve", f"{ours['output_tokens_per_s']:.1f} output tok/s ({ours['seconds']:.2f} s), "
                     f"{ours['output_tokens_per_s'] / ours['roofline_output_tokens_per_s']:.0%} of roofline"),
    ]  # fmt: skip
    if args.profile:
        profile = profile_engine_steps(
            llm.engine, lambda: run_offline(llm, prompts[: results["max_num_seqs"]], params)
        )
        rows += profile.rows()
        results["profile"] = profile.as_dict()
    if args.baseline == "hf":
        llm.close()  # its KV cache and graphs go back before the baseline loads (the weights stay)
        hf_prompts = prompts[: args.baseline_num_prompts or len(prompts)]
        batch = args.baseline_batch or len(hf_prompts)
        for name in args.baseline_dtypes.split(","):
            net = baseline_model(args, parse_dtype(name.strip()), device)
            hf_generate_time(net, hf_prompts[:2], 4)  # warm-up
            seconds = hf_batches_time(net, hf_prompts, batch, args.output_len)
            rate = len(hf_prompts) * args.output_len / seconds
            results[f"hf_{name}"] = {
                "seconds": seconds,
                "output_tokens_per_s": rate,
                "requests": len(hf_prompts),
                "batch": batch,
            }
            rows.append((f"HF generate {name}",
                         f"{rate:.1f} output tok/s ({seconds:.2f} s; "
                         f"{len(hf_prompts)} prompts, batches of {batch})"))  # fmt: skip
            rows.append((f"  gptserve / HF {name}", f"{ours['output_tokens_per_s'] / rate:.2f}x"))
            if args.baseline_static:
                _static_baseline(args, net, hf_prompts, batch, name, ours, results, rows)
            del net
    print_table("bench throughput", rows)
    write_json(args.json, results)
    return 0


def _static_baseline(
    args: argparse.Namespace,
    net: Any,
    prompts: list[list[int]],
    batch: int,
    name: str,
    ours: dict[str, Any],
    results: dict[str, Any],
    rows: list[tuple[str, str]],
) -> None:
    """HF `generate` with a static cache (compiled by transformers) on the same batches; the first batch
    is run once beforehand to compile, and timed apart."""
    key = f"hf_{name}_static"
    try:
        start = time.perf_counter()
        hf_generate_time(net, prompts[:batch], args.output_len, cache_implementation="static")
        warm = time.perf_counter() - start
        seconds = hf_batches_time(net, prompts, batch, args.output_len, cache_implementation="static")
    except Exception as e:  # a transformers version or model that cannot compile: report it
        results[key] = {"error": f"{type(e).__name__}: {e}"}
        rows.append((f"HF generate {name} static", f"failed: {type(e).__name__}: {str(e)[:200]}"))
        return
    rate = len(prompts) * args.output_len / seconds
    results[key] = {"seconds": seconds, "output_tokens_per_s": rate, "batch": batch, "warm_up_s": warm}
    detail = f"{seconds:.2f} s, batches of {batch}; first batch {warm:.0f} s"
    rows.append((f"HF generate {name} static", f"{rate:.1f} output tok/s ({detail})"))
    rows.append((f"  gptserve / HF {name} static", f"{ours['output_tokens_per_s'] / rate:.2f}x"))
