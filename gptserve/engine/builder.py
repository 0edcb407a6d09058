"""Builds a ready `LLMEngine` from a model path and engine options (the serve flags, snake case)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, TypeVar

import torch
from torch import nn

from gptserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, parse_dtype
from gptserve.engine.kv_budget import (
    DEFAULT_CPU_KV_CACHE_BYTES,
    DEFAULT_GPU_MEMORY_UTILIZATION,
    GiB,
    gpu_kv_budget,
)
from gptserve.engine.llm_engine import LLMEngine
from gptserve.engine.model_runner import ModelRunner, kv_bytes_per_token
from gptserve.errors import GptServeError
from gptserve.layers.quantized_linear import quantize_linears
from gptserve.layers.tuned_linear import use_gemv_for_one_row
from gptserve.loading.checkpoint import Checkpoint, load_checkpoint
from gptserve.models.registry import model_class
from gptserve.parallel import parallel_state
from gptserve.parallel.launcher import TensorParallelWorld, current_world, rank_device, start_world
from gptserve.parallel.sharding import check_tensor_parallel
from gptserve.parallel.worker import serve_steps
from gptserve.progress import progress_bar, progress_quiet
from gptserve.tuning.gemm_tuner import load_tuning

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class EngineOptions:
    """User-facing engine options; each mirrors a `gptserve serve` flag."""

    device: str = "auto"
    dtype: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    kv_cache_memory: int | float | str | None = None  # None: 1 GiB on CPU, what the GPU has left on CUDA
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION  # CUDA: the card's share this process uses
    # CUDA without kv_cache_memory: the part of what is left that this engine's KV cache takes, when the
    # process builds several engines one after another (a model repository); the last one takes 1.
    gpu_memory_share: float = 1.0
    block_size: int = 16
    enable_prefix_caching: bool = True
    num_kv_blocks: int | None = None
    seed: int = 0
    tensor_parallel_size: int = 1
    quantization: str = "auto"  # auto | none | int8 | int4 (weight-only)
    enforce_eager: bool = False  # CUDA: run decode steps eagerly instead of replaying CUDA graphs
    # Launch the next decode step before the host has the current step's tokens (see `LLMEngine`);
    # None: on for CUDA.
    async_scheduling: bool | None = None
    kv_cache_dtype: str = "auto"  # auto: the activations' dtype; fp8: float8 e4m3, half the bytes of fp16
    gemv: str = "auto"  # one-row products on CUDA: auto/triton = the Triton GEMV where it fits; cublas


def parse_bytes(value: int | float | str | None) -> int | None:
    """'4GiB', '512MiB', '2.5' (GiB) or a plain byte count -> bytes."""
    if value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value * GiB)
    text = value.strip().lower().replace(" ", "")
    units = {"gib": GiB, "gb": 10**9, "mib": 1 << 20, "mb": 10**6, "kib": 1 << 10, "kb": 10**3, "b": 1}
    for suffix, scale in units.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * scale)
    number = float(text)
    return int(number) if number >= 1 << 20 else int(number * GiB)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GptServeError("--device cuda was asked for but no CUDA device is available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 (fp16 on GPUs without bf16): half the bytes of fp32 to read per token."""
    if name != "auto":
        return parse_dtype(name)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


QUANTIZATIONS = ("auto", "none", "int8", "int4")


def resolve_quantization(
    name: str, stored: str | None, device: torch.device, dtype: torch.dtype
) -> str | None:
    """Weight-only format of the transformer blocks. `auto` keeps a GGUF file's 4- or 8-bit blocks
    compact on CPU (decoding there is bound by reading weights) and leaves other checkpoints as they are."""
    if name not in QUANTIZATIONS:
        raise GptServeError(f"unknown quantization {name!r}; expected one of {', '.join(QUANTIZATIONS)}")
    if name == "none":
        return None
    if name != "auto":
        return name
    if stored in ("int8", "int4"):  # converted weight-only: quantized wherever it runs
        return stored
    if stored is None or device.type != "cpu" or dtype == torch.float32:
        return None
    return "int4" if stored.startswith(("Q4", "IQ4")) else "int8"


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
    checkpoint: Checkpoint,
    model_config: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    opts: EngineOptions,
) -> nn.Module:
    """This rank's shard of the model, weights loaded (and quantized when asked), in eval mode."""
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
    return net


def build_engine(
    model: str | Path | None = None,
    options: EngineOptions | None = None,
    checkpoint: Checkpoint | None = None,
) -> LLMEngine:
    """Load the checkpoint at `model` (None = the embedded default) and size the KV cache.

    A `checkpoint` given directly (random weights for benchmarks) is used instead of reading `model`,
    which then only names it.

    With `tensor_parallel_size` N > 1 (or under `torchrun`) this process becomes rank 0 of N and returns
    the engine that drives them all; a torchrun rank other than 0 runs the worker loop here instead and
    exits when rank 0 shuts the group down.
    """
    opts = options or EngineOptions()
    gemv = _gemv_kernel(opts.gemv)
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    checkpoint = checkpoint or load_checkpoint(model)
    model_config = ModelConfig.from_hf(checkpoint.hf_config)
    world = None
    if opts.tensor_parallel_size != 1 or parallel_state.launched_by_torchrun():
        check_tensor_parallel(model_config, opts.tensor_parallel_size)
        world = start_world(opts.tensor_parallel_size, device, None if model is None else str(model), opts)
        check_tensor_parallel(model_config, world.world_size)
        device = rank_device(device)
    elif current_world() is not None:
        raise GptServeError("a tensor-parallel group is running in this process; shut it down first")
    try:
        net = load_model(checkpoint, model_config, device, dtype, opts)
        if device.type == "cuda":
            if gemv == "triton":
                use_gemv_for_one_row(net)
            load_tuning(model, device, net)  # `gptserve tune`'s file beside the model, before any GEMM runs
        if parallel_state.rank() != 0:
            _serve_worker(net, model_config, device, dtype)
    except BaseException:
        if world is not None:
            world.shutdown()
        raise
    if parallel_state.rank() != 0:
        _leave_as_worker(world, device)
    try:
        engine = _engine(model, opts, checkpoint, model_config, net, device, dtype)
        # Under tensor parallelism the graphs capture the all-reduces too; they are released before the
        # world's teardown, which waits for them.
        graphs = device.type == "cuda" and not opts.enforce_eager
        layout = _RunnerLayout(
            engine.config.cache.num_blocks,
            engine.config.cache.block_size,
            engine.config.scheduler.max_model_len,
            opts.max_num_seqs if graphs else None,
            engine.config.cache.dtype,
        )
        if world is not None:  # the workers size their caches and capture their graphs alongside
            world.before_leave.append(engine.runner.release)
            parallel_state.broadcast_object(layout)
        if layout.graph_max_num_seqs is not None:
            from gptserve.engine.cuda_graphs import capture_decode_graphs

            engine.runner.cuda_graphs = capture_decode_graphs(
                engine.runner, layout.graph_max_num_seqs, layout.max_model_len
            )
    except BaseException:
        if world is not None:
            world.shutdown()
        raise
    if world is not None:
        engine.runner.publish = parallel_state.broadcast_object
        logger.info("tensor parallel: %d ranks, this process is rank 0", world.world_size)
    return engine


def kv_cache_dtype(name: str, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The KV cache's dtype for `--kv-cache-dtype`: auto is the activations' dtype; fp8 (float8 e4m3, no
    scaling: K and V are stored rounded to 3 mantissa bits and read back into the activation dtype) needs
    a GPU of compute capability 8.9 or more (Ada, Hopper), or the CPU."""
    if name == "auto":
        return dtype
    if name != "fp8":
        raise GptServeError(f"kv_cache_dtype must be auto or fp8, got {name!r}")
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise GptServeError(
            f"an fp8 KV cache needs a GPU of compute capability 8.9 or more (Ada, Hopper); "
            f"{torch.cuda.get_device_name(device)} has {torch.cuda.get_device_capability(device)}"
        )
    return torch.float8_e4m3fn


def _gemv_kernel(name: str) -> str:
    """What runs one-row products on CUDA: "triton" (the GEMV kernel, also for auto) or "cublas"."""
    if name not in ("auto", "triton", "cublas"):
        raise GptServeError(f"gemv must be auto, triton or cublas, got {name!r}")
    return "cublas" if name == "cublas" else "triton"


def _async_scheduling(opts: EngineOptions, device: torch.device) -> bool:
    """Whether steps run ahead of the host: as asked, else on CUDA (on a CPU the model and the host share
    the cores, so there is nothing to overlap). Under tensor parallelism the ranks take rank 0's sampled
    tokens from a broadcast inside the step."""
    if opts.async_scheduling is not None:
        return opts.async_scheduling
    return device.type == "cuda"


def _leave_as_worker(world: TensorParallelWorld | None, device: torch.device) -> NoReturn:
    """A rank other than 0 after rank 0's stop message. On CUDA the process ends at once: NCCL's
    teardown can wait for peers that are leaving too, and the driver reclaims everything anyway."""
    if device.type == "cuda":
        logging.shutdown()
        os._exit(0)
    if world is not None:
        world.shutdown()
    raise SystemExit(0)


@dataclass
class _RunnerLayout:
    """What rank 0 decided that every rank's model runner must match."""

    num_blocks: int
    block_size: int
    max_model_len: int
    graph_max_num_seqs: int | None  # CUDA graphs captured up to this batch; None: eager
    kv_dtype: torch.dtype | None = None


def _serve_worker(
    net: nn.Module, model_config: ModelConfig, device: torch.device, dtype: torch.dtype
) -> None:
    """A rank other than 0: take rank 0's cache layout, capture the same graphs (their collectives meet
    rank 0's), then run its steps. Returns quietly when rank 0 gave up before sending the layout."""
    layout = parallel_state.broadcast_object()
    if layout is None:
        return
    runner = ModelRunner(
        net, model_config, layout.num_blocks, layout.block_size, device, dtype, layout.kv_dtype
    )
    if layout.graph_max_num_seqs is not None:
        from gptserve.engine.cuda_graphs import capture_decode_graphs

        runner.cuda_graphs = capture_decode_graphs(runner, layout.graph_max_num_seqs, layout.max_model_len)
    serve_steps(runner)


def _engine(
    model: str | Path | None,
    opts: EngineOptions,
    checkpoint: Checkpoint,
    model_config: ModelConfig,
    net: nn.Module,
    device: torch.device,
    dtype: torch.dtype,
) -> LLMEngine:
    max_model_len = opts.max_model_len or model_config.max_position_embeddings
    if max_model_len > model_config.max_position_embeddings and model_config.architecture == "gpt2":
        raise GptServeError(
            f"max_model_len {max_model_len} exceeds GPT-2's "
            f"{model_config.max_position_embeddings} learned positions"
        )
    kv_dtype = kv_cache_dtype(opts.kv_cache_dtype, dtype, device)
    per_token = kv_bytes_per_token(model_config, kv_dtype, parallel_state.world_size())
    block_bytes = per_token * opts.block_size
    if opts.num_kv_blocks is not None:
        num_blocks = opts.num_kv_blocks
    else:
        budget = parse_bytes(opts.kv_cache_memory)
        if budget is None and device.type == "cuda":
            budget = gpu_kv_budget(
                device,
                model_config,
                dtype,
                opts.max_num_batched_tokens,
                opts.max_num_seqs,
                parallel_state.world_size(),
                opts.gpu_memory_utilization,
                opts.gpu_memory_share,
            )
            # No more than every sequence at its longest needs: a small model keeps a small cache.
            most = opts.max_num_seqs * -(-max_model_len // opts.block_size) * block_bytes
            if budget > most:
                logger.info("KV cache capped at %.2f GiB: max_num_seqs x max_model_len", most / GiB)
                budget = most
        num_blocks = (DEFAULT_CPU_KV_CACHE_BYTES if budget is None else budget) // block_bytes
    capacity = num_blocks * opts.block_size
    if capacity < max_model_len and opts.num_kv_blocks is None:
        raise GptServeError(
            f"the KV cache holds {capacity} tokens ({num_blocks * block_bytes / GiB:.2f} GiB) but "
            f"max_model_len is {max_model_len}: raise --kv-cache-memory (or --gpu-memory-utilization) "
            "or lower --max-model-len"
        )
    config = EngineConfig(
        model=model_config,
        cache=CacheConfig(
            opts.block_size, num_blocks * block_bytes, num_blocks, opts.enable_prefix_caching, kv_dtype
        ),
        scheduler=SchedulerConfig(
            opts.max_num_seqs,
            max(opts.max_num_batched_tokens, 1),
            max_model_len,
            _async_scheduling(opts, device),
        ),
        device=device,
        dtype=dtype,
        seed=opts.seed,
    )
    logger.info(
        "model %s (%s, %s): dtype %s, device %s, KV cache %d tokens in %d blocks (%.1f MiB, %s), "
        "max_model_len %d",
        model or "embedded default",
        model_config.architecture,
        checkpoint.source,
        str(dtype).removeprefix("torch."),
        device,
        capacity,
        num_blocks,
        num_blocks * block_bytes / (1 << 20),
        str(kv_dtype).removeprefix("torch."),
        max_model_len,
    )
    tokenizer = checkpoint.tokenizer
    if tokenizer is not None and checkpoint.chat_template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = checkpoint.chat_template
    runner = ModelRunner(net, model_config, num_blocks, opts.block_size, device, dtype, kv_dtype)
    model_name = str(model) if model else "SmolLM2-135M-Instruct"
    return LLMEngine(config, runner, tokenizer, model_name, checkpoint.chat_template)
