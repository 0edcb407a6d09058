"""`gptserve bench throughput`: offline generation of a batch of prompts, output tokens per second,
next to Hugging Face `generate` on the same prompts in the same process."""

from __future__ import annotations

import argparse
import time
from typing import Any

from gptserve.bench.hf_baseline import hf_generate_time, load_hf_model
from gptserve.bench.report import print_table, write_json
from gptserve.bench.workload import random_prompts
from gptserve.config import parse_dtype
from gptserve.llm import LLM
from gptserve.sampling_params import SamplingParams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--min-input-len", type=int, default=60)
    parser.add_argument("--max-input-len", type=int, default=140)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--baseline", choices=["none", "hf"], default="none")
    parser.add_argument("--baseline-dtypes", default="fp32,bf16", help="dtypes of the HF baseline runs")
    parser.add_argument("--json", default=None, help="also write the figures to this file")


def run_offline(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> dict[str, Any]:
    """Generate for every prompt at once through the engine; time and count the output tokens."""
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
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


def run(args: argparse.Namespace, llm: LLM) -> int:
    vocab = llm.engine.model_config.vocab_size
    prompts = random_prompts(args.num_prompts, args.min_input_len, args.max_input_len, vocab)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    run_offline(llm, prompts[:2], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))  # warm-up
    ours = run_offline(llm, prompts, params)
    results: dict[str, Any] = {"gptserve": ours}
    rows = [
        (
            "workload",
            f"{len(prompts)} prompts of {args.min_input_len}-{args.max_input_len} tokens, "
            f"{args.output_len} new tokens each",
        ),
        ("gptserve", f"{ours['output_tokens_per_s']:.1f} output tok/s ({ours['seconds']:.2f} s)"),
    ]
    if args.baseline == "hf":
        device = llm.engine.config.device
        for name in args.baseline_dtypes.split(","):
            dtype = parse_dtype(name.strip())
            net = load_hf_model(args.model, dtype, device)
            hf_generate_time(net, prompts[:2], 4)  # warm-up
            seconds = hf_generate_time(net, prompts, args.output_len)
            rate = len(prompts) * args.output_len / seconds
            results[f"hf_{name}"] = {"seconds": seconds, "output_tokens_per_s": rate}
            rows.append((f"HF generate {name}", f"{rate:.1f} output tok/s ({seconds:.2f} s)"))
            rows.append((f"  gptserve / HF {name}", f"{ours['output_tokens_per_s'] / rate:.2f}x"))
            del net
    print_table("bench throughput", rows)
    write_json(args.json, results)
    return 0
