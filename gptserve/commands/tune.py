"""`gptserve tune MODEL`: tune the model's GEMMs on this GPU (the `gpt_gemm` step of the Triton +
FasterTransformer tutorial) and write the tuning file beside the model, which `serve` then loads."""

from __future__ import annotations

import argparse
from pathlib import Path

from gptserve.errors import GptServeError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="tune the model's GEMMs on this GPU; writes the tuning file beside it")
    p.add_argument("model", help="HF directory, .gguf file or converted directory")
    p.add_argument(
        "--batch-sizes",
        default=None,
        help="decode batch sizes, comma-separated (default: the CUDA-graph sizes up to --max-num-seqs)",
    )
    p.add_argument("--max-input-len", type=int, default=128, help="longest prompt a lone request sends")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--tensor-parallel-size", type=int, default=None, help="default: the checkpoint's split")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"])
    p.add_argument("--output", default=None, help="directory for the tuning file (default: the model's)")
    p.add_argument(
        "--triton",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the Triton kernels' launch configurations (the one-row GEMV's tiles, split-K "
        "tiles for few rows, large tiles for prompts)",
    )
    p.add_argument(
        "--keep",
        choices=["winners", "all"],
        default="winners",
        help="winners: serve a pick only where it beats cuBLAS's default by 2%% (timed again in CUDA "
        "graphs); all: serve the faster of TunableOp's pick and the best Triton configuration everywhere",
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from gptserve.config import ModelConfig
    from gptserve.engine.engine_options import resolve_dtype
    from gptserve.layers.tuning_file import tuning_dir
    from gptserve.loading.loader import load_checkpoint
    from gptserve.tuning.gemm_shapes import decode_row_counts, model_gemm_shapes, prefill_row_counts
    from gptserve.tuning.gemm_tuner import MIN_GAIN, served_counts, step_estimates, tune_gemms

    batch_sizes = _batch_sizes(args.batch_sizes)
    if not torch.cuda.is_available():
        raise GptServeError("tune needs a CUDA device: it times this GPU's GEMMs (nothing to tune on CPU)")
    if not Path(args.model).exists():
        raise GptServeError(f"model {args.model!r} does not exist")
    checkpoint = load_checkpoint(args.model)
    config = ModelConfig.from_hf(checkpoint.hf_config)
    tp = args.tensor_parallel_size or checkpoint.tensor_parallel_size or 1
    device = torch.device("cuda")
    dtype = resolve_dtype(args.dtype, device)
    rows = sorted(
        set(decode_row_counts(args.max_num_seqs, batch_sizes))
        | set(prefill_row_counts(args.max_input_len, args.max_num_batched_tokens))
    )
    shapes = model_gemm_shapes(config, tp)
    out_dir = Path(args.output) if args.output else tuning_dir(args.model)
    min_gain = MIN_GAIN if args.keep == "winners" else -float("inf")
    tuned = tune_gemms(shapes, rows, dtype, out_dir, device, min_gain=min_gain, triton=args.triton)
    served = served_counts(tuned)
    print(
        f"tuned {len(tuned)} GEMMs ({len(shapes)} weight shapes x {len(rows)} row counts) into {out_dir}: "
        f"{served['tunableop']} served by TunableOp picks, {served['triton']} by Triton configurations, "
        f"cuBLAS's default serves the other {served['cublas']}"
    )
    print(f"{'rows':>6}  {'cuBLAS default':>15}  {'tuned':>10}  speed-up  (GEMM time of one forward pass)")
    for m, entry in sorted(step_estimates(tuned).items(), key=lambda kv: int(kv[0])):
        default, best = entry["default_ms"], entry["tuned_ms"]
        print(f"{m:>6}  {default:>12.3f} ms  {best:>7.3f} ms  {default / best:7.2f}x")
    return 0


def _batch_sizes(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        sizes = [int(b) for b in text.split(",")]
    except ValueError:
        raise GptServeError(f"--batch-sizes must be integers separated by commas, got {text!r}") from None
    if min(sizes) < 1:
        raise GptServeError(f"--batch-sizes must be positive, got {text!r}")
    return sizes
