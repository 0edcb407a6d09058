"""The engine's host work per step, alone: the model's forward pass replaced by zero logits, so what is
timed is scheduling, packing the step, sampling bookkeeping and outputs in Python, the part a GPU waits
for between steps.

`python -m gptserve.bench.host_step MODEL [--num-prompts 1024] [--max-num-seqs 512]`
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from gptserve.bench.report import print_table
from gptserve.bench.workload import median, random_prompts
from gptserve.llm import LLM
from gptserve.sampling_params import SamplingParams


def host_ms_per_step(llm: LLM, prompts: list[list[int]], output_len: int) -> float:
    """Wall milliseconds per engine step of generating for `prompts` with the model stubbed out. The stub
    writes no KV, so the prefix cache is emptied afterwards (nothing it computed may be reused)."""
    engine = llm.engine
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    real_run = engine.runner.run
    engine.runner.run = lambda step, input_ids=None: torch.zeros(len(step.logits_rows), vocab)
    try:
        before = engine.core.num_steps
        start = time.perf_counter()
        llm.generate(prompts, params)
        elapsed = time.perf_counter() - start
    finally:
        engine.runner.run = real_run
        engine.core.kv.reset_prefix_cache()
    return elapsed / max(engine.core.num_steps - before, 1) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--num-prompts", type=int, default=1024)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=512)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    llm = LLM(
        args.model,
        device="cpu",
        dtype="fp32",
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.input_len + args.output_len,
        enable_prefix_caching=False,
    )
    gc.freeze()  # as `serve` and `bench` do after start-up
    vocab = llm.engine.model_config.vocab_size
    runs = []
    for repeat in range(args.repeats + 1):  # the first run warms up
        prompts = random_prompts(args.num_prompts, args.input_len, args.input_len, vocab, seed=repeat)
        runs.append(host_ms_per_step(llm, prompts, args.output_len))
    rows = [
        (
            "workload",
            f"{args.num_prompts} prompts of {args.input_len} tokens, {args.output_len} new tokens each, "
            f"<= {args.max_num_seqs} sequences a step, model stubbed out",
        ),
        ("host work per step", f"{median(runs[1:]):.2f} ms (median of {args.repeats})"),
    ]
    print_table("engine host work", rows)


if __name__ == "__main__":
    main()
