"""`EngineOptions` (the serve flags, snake case) and what each resolves to on this machine: device, dtype,
weight-only quantization, KV cache dtype, one-row product kernel, asynchronous scheduling."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptserve.config import parse_dtype
from gptserve.engine.kv_budget import DEFAULT_GPU_MEMORY_UTILIZATION, GiB
from gptserve.errors import GptServeError
from gptserve.parallel import parallel_state


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
    # Default sampling values for fields a request leaves out: auto (the model's generation_config.json,
    # else what is known of the model), none (gptserve's own) or a directory/file holding one.
    generation_config: str = "auto"


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


def rank_device(device: torch.device) -> torch.device:
    """The device this tensor-parallel rank computes on: `cuda:<local rank>` on CUDA."""
    if device.type != "cuda" or parallel_state.world_size() == 1:
        return device
    return torch.device("cuda", parallel_state.local_rank())


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


def gemv_kernel(name: str) -> str:
    """What runs one-row products on CUDA: "triton" (the GEMV kernel, also for auto) or "cublas"."""
    if name not in ("auto", "triton", "cublas"):
        raise GptServeError(f"gemv must be auto, triton or cublas, got {name!r}")
    return "cublas" if name == "cublas" else "triton"


def async_scheduling(opts: EngineOptions, device: torch.device) -> bool:
    """Whether steps run ahead of the host: as asked, else on CUDA (on a CPU the model and the host share
    the cores, so there is nothing to overlap). Under tensor parallelism the ranks take rank 0's sampled
    tokens from a broadcast inside the step."""
    if opts.async_scheduling is not None:
        return opts.async_scheduling
    return device.type == "cuda"
