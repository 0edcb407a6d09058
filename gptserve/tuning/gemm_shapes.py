"""Every GEMM shape a model runs on one tensor-parallel rank: the weight shapes of its linear layers (built
on the meta device, so nothing is allocated) and the row counts of decode steps and prompt chunks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gptserve.config import ModelConfig
from gptserve.engine.cuda_graphs import DEFAULT_BATCH_SIZES, PREFILL_TOKEN_COUNTS
from gptserve.layers.parallel_linear import RowParallelLinear
from gptserve.models.registry import model_class
from gptserve.parallel import parallel_state


@dataclass(frozen=True)
class GemmShape:
    """y[m, n] = x[m, k] @ w[n, k]^T (+ bias[n]) for one group of layers of the same weight shape."""

    name: str  # the layers' attribute name, e.g. "qkv_proj", "fc_out", "lm_head"
    n: int
    k: int
    bias: bool
    layers: int  # how many layers of the model have this shape


def model_gemm_shapes(config: ModelConfig, tensor_parallel_size: int = 1) -> list[GemmShape]:
    """The distinct (name, n, k, bias) of the model's linear layers on one of `tensor_parallel_size` ranks,
    the output head included."""
    with parallel_state.assumed_world(tensor_parallel_size), torch.device("meta"):
        net = model_class(config)(config)
    counts: dict[tuple[str, int, int, bool], int] = {}
    for name, module in net.named_modules():
        if isinstance(module, nn.Linear):
            # A row-parallel layer adds its bias after the all-reduce, outside the GEMM, unless its
            # reduction is deferred (rank 0 then adds it in the GEMM; tuned here as rank 0 runs it); an
            # MLP's biases are added by the fused kernels after the GEMM on CUDA.
            outside = isinstance(module, RowParallelLinear) and module.reduce
            outside = outside or getattr(module, "bias_in_epilogue", False)
            bias = module.bias is not None and not outside
            key = (name.rsplit(".", 1)[-1], module.out_features, module.in_features, bias)
            counts[key] = counts.get(key, 0) + 1
    if not any(key[0] == "lm_head" for key in counts):  # a tied head multiplies by the embedding
        rows = -(-config.vocab_size // tensor_parallel_size)
        counts[("lm_head", rows, config.hidden_size, False)] = 1
    return [GemmShape(name, n, k, bias, layers) for (name, n, k, bias), layers in counts.items()]


def decode_row_counts(max_num_seqs: int, batch_sizes: list[int] | None = None) -> list[int]:
    """Row counts of decode steps: the CUDA-graph batch sizes up to `max_num_seqs` unless given."""
    sizes = batch_sizes or [b for b in DEFAULT_BATCH_SIZES if b <= max_num_seqs]
    return sorted(set(sizes) | {min(max_num_seqs, DEFAULT_BATCH_SIZES[-1])})


def prefill_row_counts(max_input_len: int, max_num_batched_tokens: int) -> list[int]:
    """Row counts of prompt steps: the prefill-graph token counts a lone prompt of up to `max_input_len`
    tokens uses, then powers of two above it (several prompts in one step) up to the token budget."""
    counts = {n for n in PREFILL_TOKEN_COUNTS if n < max_input_len}
    counts.add(next((n for n in PREFILL_TOKEN_COUNTS if n >= max_input_len), max_input_len))
    n = 1 << max(max(counts), 1).bit_length()
    while n < max_num_batched_tokens:
        counts.add(n)
        n *= 2
    counts.add(max_num_batched_tokens)
    return sorted(counts)
