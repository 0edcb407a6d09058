"""`gptserve convert SRC DST`: any readable checkpoint -> the pre-split converted format.

Sources: Hugging Face directories, GGUF files, gptserve converted directories, FasterTransformer
c-model directories and mesh-transformer-jax slim checkpoints (`--config` gives their hyper-parameters).
The output is written into a temporary directory beside DST and renamed into place only when complete,
so a failed conversion leaves nothing that loads.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import shutil
import time
from pathlib import Path

from gptserve.errors import GptServeError

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint into the pre-split serving format")
    p.add_argument(
        "src", help="HF directory, .gguf file, FT c-model directory, mesh-transformer-jax slim dir"
    )
    p.add_argument("dst", help="output directory (must not exist unless --force)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="ranks to split for (default 1)")
    p.add_argument(
        "--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"], help="auto keeps the source's"
    )
    p.add_argument("--quantize", default="none", choices=["none", "int8"], help="int8 weight-only")
    p.add_argument("--config", default=None, help="mesh-transformer-jax config JSON for a slim checkpoint")
    p.add_argument("--tokenizer", default=None, help="HF directory whose tokenizer files to include")
    p.add_argument("--force", action="store_true", help="replace an existing DST")


def run(args: argparse.Namespace) -> int:
    from gptserve.config import parse_dtype
    from gptserve.loading.converted_writer import rank_file_name, write_converted

    src, dst = Path(args.src).expanduser(), Path(args.dst).expanduser()
    if dst.exists() and not args.force:
        raise GptServeError(f"{dst} already exists; pass --force to replace it")
    checkpoint = _read_source(src, args.config)
    if args.tokenizer is not None:
        _use_tokenizer(checkpoint, Path(args.tokenizer).expanduser())
    dtype = None if args.dtype == "auto" else parse_dtype(args.dtype)
    quantization = None if args.quantize == "none" else args.quantize

    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    partial.mkdir()
    start = time.perf_counter()
    try:
        with _progress_bar(checkpoint.hf_config) as bar:
            stats = write_converted(
                checkpoint, partial, args.tensor_parallel_size, dtype, quantization, progress=bar.update
            )
            bar.total = bar.n  # the estimate leaves out biases and norms
        _keep_generation_config(src, partial)
        _move_into_place(partial, dst)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    files = ", ".join(rank_file_name(r, args.tensor_parallel_size) for r in range(args.tensor_parallel_size))
    print(
        f"converted {src} -> {dst} ({files}): {stats.tensors} tensors, {stats.bytes_written / 1e6:.1f} MB "
        f"in {seconds:.2f} s ({stats.bytes_written / 1e9 / max(seconds, 1e-9):.2f} GB/s), "
        f"peak RSS {peak_rss / 2**20:.0f} MiB"
    )
    return 0


def _keep_generation_config(src: Path, dst: Path) -> None:
    """Copy the source's `generation_config.json` (the model's default sampling values) beside the
    converted weights, where `--generation-config auto` reads it."""
    from gptserve.loading.generation_config import GENERATION_CONFIG_FILE

    found = (src if src.is_dir() else src.parent) / GENERATION_CONFIG_FILE
    if found.is_file():
        shutil.copyfile(found, dst / GENERATION_CONFIG_FILE)


def _read_source(src: Path, config_file: str | None):
    from gptserve.loading.loader import load_checkpoint
    from gptserve.loading.mtj_slim import is_mtj_slim_dir, read_mtj_checkpoint

    if src.is_dir() and is_mtj_slim_dir(src):
        return read_mtj_checkpoint(src, config_file)
    if config_file is not None:
        raise GptServeError(f"--config is for mesh-transformer-jax slim checkpoints, and {src} is not one")
    return load_checkpoint(src)


def _use_tokenizer(checkpoint, directory: Path) -> None:
    from gptserve.loading.hf_dir import read_chat_template, read_tokenizer

    tokenizer = read_tokenizer(directory)
    if tokenizer is None:
        raise GptServeError(f"--tokenizer {directory} holds no tokenizer files")
    checkpoint.tokenizer = tokenizer
    checkpoint.chat_template = read_chat_template(directory, tokenizer)


def _progress_bar(hf_config: dict):
    """A tqdm bar over the model's parameters; silent when stderr is no terminal or logging is quiet."""
    from gptserve.config import ModelConfig
    from gptserve.progress import progress_bar

    c = ModelConfig.from_hf(hf_config)
    # Matrices only (biases and norms are a rounding error): enough for a bar, no model to build.
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    gated = c.architecture in ("llama", "qwen2", "qwen3")  # gate, up and down
    mlp = (3 if gated else 2) * c.hidden_size * c.intermediate_size
    per_layer = c.hidden_size * (2 * q + 2 * kv) + mlp
    total = c.num_layers * per_layer + c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return progress_bar(total=total, desc="convert", unit="param", unit_scale=True)


def _move_into_place(partial: Path, dst: Path) -> None:
    """Rename the finished directory to `dst`; an existing `dst` (--force) is removed only afterwards."""
    if not dst.exists():
        partial.rename(dst)
        return
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    dst.rename(old)
    partial.rename(dst)
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()
