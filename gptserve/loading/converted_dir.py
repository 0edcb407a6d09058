"""Reads gptserve's converted format (see `converted_writer`) for any runtime tensor-parallel size.

A runtime with the tensor-parallel size the directory was written for reads only its rank's file; any
other size (1 included) merges the ranks' slices of each tensor and re-splits them. Every file's header
is checked when the directory is opened: each rank file present and readable (a truncated one fails
here, naming the file), and each tensor's dtype the one `config.json` records. Int8 weights are handed
out dequantized (int8 * scale, in the recorded dtype) and the checkpoint reports `quantization="int8"`,
so the engine quantizes them back, exactly, into `Int8Linear` layers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from gptserve.config import ModelConfig, parse_dtype
from gptserve.errors import ModelLoadError
from gptserve.loading.checkpoint import Checkpoint
from gptserve.loading.converted_writer import (
    DTYPE_NAMES,
    FORMAT_VERSION,
    SCALE_SUFFIX,
    SECTION,
    output_axis,
    rank_file_name,
)
from gptserve.loading.hf_dir import read_chat_template, read_tokenizer
from gptserve.parallel.sharding import merge_hf_shards, shard_hf_tensor


def is_converted_dir(path: Path) -> bool:
    """Whether `path` holds a `config.json` with a "gptserve" section."""
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return SECTION in json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


class ConvertedDir:
    """An open converted directory: config and every rank file's header checked."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        path = self.directory / "config.json"
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
            section: dict[str, Any] = config.pop(SECTION)
            self.world_size = int(section["tensor_parallel_size"])
            self.dtype = parse_dtype(section["dtype"])
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise ModelLoadError(f"{path}: not a readable gptserve converted config: {error!r}") from None
        if section.get("format_version") != FORMAT_VERSION:
            raise ModelLoadError(
                f"{path}: format_version {section.get('format_version')!r}, gptserve reads {FORMAT_VERSION}"
            )
        self.quantization = section.get("quantization")
        self.hf_config = config
        self.config = ModelConfig.from_hf(config)
        self.files = [self.directory / rank_file_name(r, self.world_size) for r in range(self.world_size)]
        self.names = self._check_files()

    def checkpoint(self) -> Checkpoint:
        """This directory as a `Checkpoint`."""
        tokenizer = read_tokenizer(self.directory)
        quant = f", {self.quantization}" if self.quantization else ""
        return Checkpoint(
            hf_config=self.hf_config,
            weights=self.weights,
            tokenizer=tokenizer,
            chat_template=read_chat_template(self.directory, tokenizer),
            source=f"gptserve converted, {self.world_size} rank(s), {DTYPE_NAMES[self.dtype]}{quant}",
            quantization=self.quantization,
            rank_weights=self.rank_weights,
            tensor_parallel_size=self.world_size,
        )

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full Hugging Face tensors: every rank's slice of a tensor read and merged, one tensor at a time."""
        return self.rank_weights(0, 1)

    def rank_weights(self, rank: int, world_size: int) -> Iterator[tuple[str, torch.Tensor]]:
        """Rank `rank`'s slices for a world of `world_size` (the stored slices when the sizes match)."""
        same = world_size == self.world_size
        with ExitStack() as stack:
            files = [self.files[rank]] if same else self.files
            handles = [stack.enter_context(safe_open(str(f), framework="pt")) for f in files]
            for name in self.names:
                if same:
                    yield name, self._dequantized(name, handles[0])
                else:
                    slices = [self._dequantized(name, h) for h in handles]
                    merged = merge_hf_shards(self.config, name, slices)
                    yield name, shard_hf_tensor(self.config, name, merged, rank, world_size)

    def _dequantized(self, name: str, handle: Any) -> torch.Tensor:
        tensor = handle.get_tensor(name)
        if tensor.dtype != torch.int8:
            return tensor
        scale = handle.get_tensor(name + SCALE_SUFFIX).float()
        axis = output_axis(self.config, name)
        values = tensor.float() * (scale[:, None] if axis == 0 else scale[None, :])
        return values.to(self.dtype)

    def _check_files(self) -> list[str]:
        """The tensor names (scales folded into their weights); raises naming the first bad file."""
        names: list[str] | None = None
        for file in self.files:
            if not file.is_file():
                raise ModelLoadError(
                    f"rank file {file} is missing (config.json says tensor_parallel_size {self.world_size})"
                )
            try:
                with safe_open(str(file), framework="pt") as f:
                    dtypes = {key: f.get_slice(key).get_dtype() for key in f.keys()}  # noqa: SIM118
            except Exception as error:
                raise ModelLoadError(f"rank file {file} is corrupt or truncated: {error}") from None
            expected = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
            for key, stored in dtypes.items():
                if stored == "I8" and self.quantization == "int8" and key + SCALE_SUFFIX in dtypes:
                    continue
                if expected.get(stored) != self.dtype:
                    raise ModelLoadError(
                        f"rank file {file}: tensor {key!r} is {stored}, but config.json records dtype "
                        f"{DTYPE_NAMES[self.dtype]}"
                    )
            file_names = [k for k in dtypes if not k.endswith(SCALE_SUFFIX)]
            if names is not None and sorted(file_names) != sorted(names):
                raise ModelLoadError(f"rank file {file} holds other tensors than {self.files[0]}")
            names = names or file_names
        return names or []


def read_converted_checkpoint(directory: Path) -> Checkpoint:
    """Read a gptserve converted directory."""
    return ConvertedDir(directory).checkpoint()
