"""Where a CUDA decode step's time goes: graph replay time per batch size on the GPU alone, the engine's
whole step around it, and the kernels of one replay.

`python -m gptserve.bench.decode_profile --random-weights gptj-6b --batch-sizes 1,64,256`
"""

from __future__ import annotations

import argparse
import time

import torch

from gptserve.bench.hardware import copy_bandwidth, decode_weight_bytes
from gptserve.bench.random_weights import random_checkpoint
from gptserve.bench.report import print_table
from gptserve.bench.workload import median, random_prompts
from gptserve.engine.builder import build_engine
from gptserve.engine.engine_options import EngineOptions
from gptserve.engine.kv_budget import kv_bytes_per_token
from gptserve.sampling_params import SamplingParams


@torch.inference_mode()
def replay_ms(graph, context_len: int, num_blocks: int, block_size: int, repeats: int = 50) -> float:
    """Median GPU milliseconds of one replay with every row attending to `context_len` tokens."""
    blocks = -(-context_len // block_size)
    perm = torch.randperm(num_blocks - 1)[: graph.batch * blocks] + 1
    graph.tables.zero_()
    graph.tables[:, :blocks] = perm.view(graph.batch, blocks).to(graph.tables.device)
    graph.lens.fill_(context_len)
    graph.slots.fill_(-1)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return median(times)


def step_mix(engine, num_prompts: int) -> list[tuple[str, str]]:
    """Kinds of steps a batch of 128/128 requests runs (graph replay, eager decode, eager with a prefill
    chunk) and the wall time each takes, synchronized per step."""
    runner = engine.runner
    run = runner.run
    spent: dict[str, list[float]] = {}

    def timed(step, input_ids=None):
        graphs = runner.graphs
        if graphs is not None and graphs.can_replay(step):
            kind = "graph replay"
        elif step.prefills:
            kind = "eager with prefill"
        else:
            kind = "eager decode"
        torch.cuda.synchronize()
        start = time.perf_counter()
        if kind == "eager with prefill" and len(spent.get(kind, [])) == 2:  # the third: profiled
            with torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            ) as prof:
                out = run(step, input_ids)
                torch.cuda.synchronize()
            tokens = len(step.input_ids)
            print(f"one eager step with prefill chunks: {tokens} tokens, {len(step.prefills)} chunks")
            print(
                prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60)
            )
            start = time.perf_counter()
            out = run(step, input_ids)  # timed without the profiler (a re-run rewrites the same slots)
        else:
            out = run(step, input_ids)
        torch.cuda.synchronize()
        spent.setdefault(kind, []).append(time.perf_counter() - start)
        return out

    runner.run = timed
    prompts = random_prompts(num_prompts, 128, 128, engine.model_config.vocab_size, seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"mix-{i}", prompt, params)
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    wall = time.perf_counter() - start
    runner.run = run
    rows = [
        (f"step mix, {num_prompts} x 128/128", f"{wall:.2f} s wall, {num_prompts * 128 / wall:.0f} tok/s")
    ]
    for kind, times in spent.items():
        rows.append(
            (f"  {kind}", f"{len(times)} steps, {sum(times):.2f} s, median {median(times) * 1e3:.2f} ms")
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--random-weights", default="gptj-6b")
    parser.add_argument("--batch-sizes", default="1,64,256")
    parser.add_argument("--context-len", type=int, default=192)
    parser.add_argument("--kv-cache-memory", default=None, help="default: what the GPU has left")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--mix-prompts", type=int, default=512, help="prompts of the step-mix workload")
    args = parser.parse_args()
    opts = EngineOptions(
        device="cuda",
        dtype="fp16",
        kv_cache_memory=args.kv_cache_memory,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )
    checkpoint = random_checkpoint(args.random_weights, "cuda", torch.float16)
    engine = build_engine(f"random:{args.random_weights}", opts, checkpoint=checkpoint)
    runner = engine.runner
    graphs = runner.graphs
    bandwidth = copy_bandwidth(torch.device("cuda"))
    weights = decode_weight_bytes(runner.model)
    kv_token = kv_bytes_per_token(engine.model_config, engine.runner.layers[0].kv_cache.dtype)
    num_blocks = engine.config.cache.num_blocks
    rows = [
        ("copy bandwidth", f"{bandwidth / 1e9:.0f} GB/s"),
        ("weights per step", f"{weights / 1e9:.2f} GB"),
    ]

    # The engine's whole decode step for one request, against the replay alone.
    prompt = random_prompts(1, 128, 128, engine.model_config.vocab_size)[0]
    engine.add_request("p", prompt, SamplingParams(temperature=0.0, max_tokens=130, ignore_eos=True))
    engine.step()  # prefill
    step_times = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        step_times.append((time.perf_counter() - start) * 1e3)
    rows.append(("engine decode step, batch 1", f"{median(step_times):.3f} ms (wall, median)"))

    for batch in (int(b) for b in args.batch_sizes.split(",")):
        ms = replay_ms(graphs.decode_graphs[batch], args.context_len, num_blocks, runner.block_size)
        moved = weights + batch * args.context_len * kv_token
        rows.append(
            (
                f"graph replay, batch {batch}, context {args.context_len}",
                f"{ms:.3f} ms, {moved / ms / 1e6:.0f} GB/s = {moved / ms / 1e-3 / bandwidth:.0%} of copy; "
                f"{batch / ms * 1e3:.0f} tok/s",
            )
        )
    if args.mix_prompts:
        rows += step_mix(engine, args.mix_prompts)
    graph = graphs.decode_graphs[1]
    replay_ms(graph, 128, num_blocks, runner.block_size, repeats=3)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            graph.graph.replay()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70))
    print_table("decode profile", rows)


if __name__ == "__main__":
    main()
