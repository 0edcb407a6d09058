"""`gptserve bench latency|throughput|grammar|serve|load`: benchmarks that print their figures and, when
asked, a baseline measured in the same run (`grammar`: always, decoding unconstrained); `load` is the
server's bounded load test (pass or fail)."""

from __future__ import annotations

import argparse
import gc
import importlib

from gptserve.errors import GptServeError

MODES = {
    "latency": "gptserve.bench.latency",
    "throughput": "gptserve.bench.throughput",
    "grammar": "gptserve.bench.grammar",
    "serve": "gptserve.bench.serve",
    "load": "gptserve.bench.load",
}
NEEDS_ENGINE = {"latency", "throughput", "grammar"}


def _summary(doc: str) -> str:
    """A module docstring's first paragraph as one line, without its "`gptserve bench X`: " head, so
    that `--help` shows whole sentences."""
    first = " ".join(doc.strip().split("\n\n")[0].split())
    head, sep, rest = first.partition("`: ")
    return rest[:1].upper() + rest[1:] if sep and head.startswith("`gptserve") else first


def add_parser(sub: argparse._SubParsersAction) -> None:
    from gptserve.cli import add_engine_args

    p = sub.add_parser("bench", help="benchmarks (latency, throughput, grammar, serve, load)")
    modes = p.add_subparsers(dest="mode", required=True)
    for mode, path in MODES.items():
        try:
            module = importlib.import_module(path)
        except ImportError:
            continue
        summary = _summary(module.__doc__ or "")
        mp = modes.add_parser(mode, help=summary, description=summary)
        add_engine_args(mp)
        if mode in NEEDS_ENGINE:
            mp.add_argument(
                "--random-weights",
                default=None,
                metavar="SHAPE",
                help="benchmark random weights of a known shape (gptj-6b) instead of a checkpoint",
            )
        module.add_arguments(mp)


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(MODES[args.mode])
    if args.mode not in NEEDS_ENGINE:
        return module.run(args)
    from gptserve.cli import engine_options
    from gptserve.llm import LLM

    options = engine_options(args)
    args.checkpoint = None
    if args.random_weights:
        if options.tensor_parallel_size != 1:  # every rank reads its shard from a checkpoint
            raise GptServeError(
                "--random-weights builds the model in one process; for --tensor-parallel-size "
                f"{options.tensor_parallel_size} save a checkpoint and `gptserve convert` it"
            )
        from gptserve.bench.random_weights import random_checkpoint
        from gptserve.engine.builder import build_engine
        from gptserve.engine.engine_options import resolve_device, resolve_dtype

        device = resolve_device(options.device)
        args.checkpoint = random_checkpoint(args.random_weights, device, resolve_dtype(options.dtype, device))
        llm = LLM.from_engine(
            build_engine(f"random:{args.random_weights}", options, checkpoint=args.checkpoint)
        )
    else:
        llm = LLM(args.model, **vars(options))
    gc.freeze()  # as `serve` does: start-up objects stay out of the collector's passes during the run
    return module.run(args, llm)
