"""Hugging Face transformers `generate` on the same checkpoint, as the in-process baseline."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from gptserve.loading.default_model import default_model_path


def add_baseline_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every benchmark with a Hugging Face baseline takes."""
    parser.add_argument("--baseline", choices=["none", "hf"], default="none")
    parser.add_argument("--baseline-dtypes", default="fp32,bf16", help="dtypes of the HF baseline runs")
    parser.add_argument(
        "--baseline-static",
        action="store_true",
        help='also time HF generate with cache_implementation="static" (compiled by transformers)',
    )


def load_hf_model(model: str | Path | None, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """The checkpoint as a transformers model (GGUF files are dequantized by transformers itself)."""
    from transformers import AutoModelForCausalLM

    path = default_model_path() if model is None else Path(model)
    if path.is_file():
        net = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    else:
        net = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    net.generation_config.eos_token_id = None  # generate exactly the requested lengths
    net.generation_config.pad_token_id = 0
    return net.to(device).eval()


def baseline_model(args: argparse.Namespace, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """The benchmark's model as a transformers model: the same random weights when the engine runs
    `--random-weights`, else the checkpoint read by transformers."""
    checkpoint = getattr(args, "checkpoint", None)
    if checkpoint is not None:
        from gptserve.bench.random_weights import hf_model_from_checkpoint

        return hf_model_from_checkpoint(checkpoint, dtype, device)
    return load_hf_model(args.model, dtype, device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def hf_generate_time(
    net: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int, **generate_kwargs
) -> float:
    """Seconds for one greedy batched `generate` of all prompts (left-padded), max_new_tokens each."""
    device = next(net.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    _sync(device)
    start = time.perf_counter()
    net.generate(
        ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        **generate_kwargs,
    )
    _sync(device)
    return time.perf_counter() - start


def hf_batches_time(
    net: torch.nn.Module, prompts: list[list[int]], batch: int, max_new_tokens: int, **generate_kwargs
) -> float:
    """Seconds for `hf_generate_time` over `prompts` in consecutive batches of `batch`."""
    return sum(
        hf_generate_time(net, prompts[i : i + batch], max_new_tokens, **generate_kwargs)
        for i in range(0, len(prompts), batch)
    )
