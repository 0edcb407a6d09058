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
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where to run (auto: CUDA if present)",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "fp16", "bf16"],
        help="weights' and activations' dtype (auto: the checkpoint's, fp32 on CPU)",
    )
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="longest sequence, prompt + output (default: the model's)",
    )
    parser.add_argument("--max-num-seqs", type=int, default=256, help="sequences batched together at most")
    parser.add_argument(
        "--max-num-batched-tokens", type=int, default=2048, help="tokens one engine step processes at most"
    )
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
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    parser.add_argument(
        "--no-prefix-caching", action="store_true", help="do not reuse the KV cache of shared prompt prefixes"
    )
    parser.add_argument(
        "--tensor-parallel-size", type=int, default=1, help="GPUs the model is split over (one process each)"
    )
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
    parser.add_argument(
        "--generation-config",
        default="auto",
        metavar="auto|none|PATH",
        help="default sampling values (temperature, top_p, top_k, min_p, repetition_penalty) for fields a "
        "request leaves out: auto: the model's generation_config.json, else its card's values (embedded "
        "SmolLM2), else gptserve's; none: gptserve's (temperature 1, no truncation); PATH: a directory "
        "or file holding a generation_config.json",
    )


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default, unless the help already tells it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if "default" in help or action.default in (None, argparse.SUPPRESS) or action.default == []:
            return help
        return super()._get_help_string(action)


class HelpWithListsFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """`HelpFormatter`, with the description and epilog printed as written (line breaks kept)."""


def add_log_level(parser: argparse.ArgumentParser, default: str = argparse.SUPPRESS) -> None:
    parser.add_argument(
        "--log-level",
        default=default,
        choices=["debug", "info", "warning", "error"],
        help="how much to log" + (" (default: info)" if default == argparse.SUPPRESS else ""),
    )


def _add_log_level_everywhere(parser: argparse.ArgumentParser) -> None:
    """`--log-level` after any sub-command (and sub-sub-command), as well as before it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                if "--log-level" not in child._option_string_actions:
                    add_log_level(child)
                _add_log_level_everywhere(child)


def sampling_params_from_flags(**values):
    """`SamplingParams` from command-line flags (None = the default); an out-of-range value raises a
    `GptServeError` naming the flag (`--max-tokens`, not `max_tokens`), before anything is loaded."""
    from gptserve.errors import InvalidRequestError
    from gptserve.sampling_params import SamplingParams

    try:
        return SamplingParams(**{k: v for k, v in values.items() if v is not None})
    except InvalidRequestError as e:
        param = e.param or ""
        flag = "--" + param.replace("_", "-")
        message = str(e)
        if param and message.startswith(param):
            message = flag + message[len(param) :]
        raise GptServeError(message) from None


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
        generation_config=args.generation_config,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gptserve", description="Local GPT inference server.")
    add_log_level(parser, default="info")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {name: importlib.import_module(path) for name, path in COMMANDS.items()}
    for module in modules.values():
        module.add_parser(sub)
    _add_log_level_everywhere(parser)
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
