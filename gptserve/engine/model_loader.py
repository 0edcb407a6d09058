"""Loads this rank's shard of the model, ready to run: built in the activations' dtype on its device,
weights read from the checkpoint, weight-only quantized when asked and, on CUDA, its one-row products
and GEMMs set up as `--gemv` and the model's tuning file say."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from gptserve.config import ModelConfig
from gptserve.engine.engine_options import EngineOptions, gemv_kernel, resolve_quantization
from gptserve.layers.quantized_linear import quantize_linears
from gptserve.layers.tuned_linear import use_gemv_for_one_row
from gptserve.layers.tuning_file import load_tuning
from gptserve.loading.checkpoint import Checkpoint
from gptserve.models.registry import model_class
from gptserve.parallel import parallel_state
from gptserve.progress import progress_bar, progress_quiet

logger = logging.getLogger(__name__)
T = TypeVar("T")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _counted(items: Iterable[T], tick: Callable[[int], object]) -> Iterator[T]:
    """`items`, calling `tick(1)` as each one passes (drives a progress bar)."""
    for item in items:
        tick(1)
        yield item


def load_model(
    model: str | Path | None,
    checkpoint: Checkpoint,
    model_config: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    opts: EngineOptions,
) -> nn.Module:
    """This rank's shard of the model read from `checkpoint` (which `model` names), weights loaded and
    quantized when asked, in eval mode; on CUDA with the one-row product kernel `opts.gemv` picks and the
    tuning file beside `model` applied."""
    gemv = gemv_kernel(opts.gemv)
    with _default_dtype(dtype), torch.device(device):
        net = model_class(model_config)(model_config)
    weights = checkpoint.weights_for_rank(parallel_state.rank(), parallel_state.world_size())
    quiet = progress_quiet() or parallel_state.rank() != 0
    with progress_bar(desc="loading weights", unit="tensor", disable=quiet) as bar:
        net.load_weights(_counted(weights, bar.update))
    net.eval()
    quantization = resolve_quantization(opts.quantization, checkpoint.quantization, device, dtype)
    if quantization is not None:
        # `auto` quantizes for speed, not memory: on CPU the dense weights stay for prefill and batched
        # decode, which run faster as dense GEMMs. An explicit int8/int4 keeps only the compact weights.
        converted = checkpoint.quantization == quantization  # a converted int8 dir stays compact
        keep_dense = opts.quantization == "auto" and device.type == "cpu" and not converted
        counts = quantize_linears(net, quantization, "int8", keep_dense=keep_dense)
        logger.info("weight-only quantization: %s", ", ".join(f"{n} {k} layers" for k, n in counts.items()))
    if device.type == "cuda":
        if gemv == "triton":
            use_gemv_for_one_row(net)
        load_tuning(model, device, net)  # `gptserve tune`'s file beside the model, before any GEMM runs
    return net
