"""`gptserve` command line: one sub-command per job, each in its own module under `gptserve/commands/`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from gptserve.errors import GptServeError

COMMANDS = {
    "generate": "gptserve.commands.generate",
    "bench": "gptserve.commands.bench",
    "serve": "gptserve.commands.serve",
    "convert": "gptserve.commands.convert",
    "tune": "gptserve.commands.tune",
    "client": "gptserve.commands.client",
    "chat": "gptserve.commands.chat",
}


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """The engine flags shared by serve, generate and bench."""
    parser.add_argument(
        "model", nargs="?", default=None, help="HF directory, .gguf file; none = embedded default"
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument(
        "--kv-cache-memory",
        default=None,
        help="KV cache budget: bytes, or e.g. 2GiB (default: 1GiB on CPU; on CUDA what the GPU has left)",
    )
    parser.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="CUDA: the fraction of the GPU's memory this process may use; the KV cache gets what the "
        "weights and activations leave (ignored when --kv-cache-memory is given)",
    )
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument(
        "--quantization",
        default="auto",
        choices=["auto", "none", "int8", "int4"],
        help="weight-only quantization; auto keeps a GGUF file's 4/8-bit weights compact on CPU",
    )
    parser.add_argument(
        "--enforce-eager", action="store_true", help="CUDA: run decode steps eagerly, no CUDA graphs"
    )
    parser.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", "fp8"],
        help="auto: K and V cached in the model's dtype; fp8: float8 e4m3, twice the tokens in the same "
        "memory and half the bytes read per decode step (GPU: compute capability 8.9+)",
    )
    parser.add_argument(
        "--async-scheduling",
        default="auto",
        choices=["auto", "on", "off"],
        help="launch the next decode step before the host has this step's tokens, overlapping the "
        "host's work with the GPU's (auto: on for CUDA)",
    )
    parser.add_argument(
        "--gemv",
        default="auto",
        choices=["auto", "triton", "cublas"],
        help="CUDA: what multiplies one row (a lone sequence's decode step) by an fp16/bf16 weight; auto: "
        "the Triton GEMV where its tile divides the weight (`gptserve tune` may choose otherwise)",
    )


def engine_options(args: argparse.Namespace):
    from gptserve.engine.engine_options import EngineOptions

    return EngineOptions(
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization,
        block_size=args.block_size,
        enable_prefix_caching=not args.no_prefix_caching,
        tensor_parallel_size=args.tensor_parallel_size,
        quantization=args.quantization,
        enforce_eager=args.enforce_eager,
        async_scheduling={"auto": None, "on": True, "off": False}[args.async_scheduling],
        kv_cache_dtype=args.kv_cache_dtype,
        gemv=args.gemv,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gptserve", description="Local GPT inference server.")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {name: importlib.import_module(path) for name, path in COMMANDS.items()}
    for module in modules.values():
        module.add_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return modules[args.command].run(args) or 0
    except GptServeError as e:
        print(f"gptserve {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
