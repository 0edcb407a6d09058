"""Writes gptserve's converted format: one directory, pre-split for a tensor-parallel size.

    config.json                          the Hugging Face config plus a "gptserve" section:
                                         {"format_version", "tensor_parallel_size", "dtype", "quantization"}
    tokenizer files, chat_template.jinja when the source had a tokenizer
    model-rank-{r}-of-{N}.safetensors    rank r's Megatron slice of every tensor, under its HF name

With int8 quantization each 2-D linear weight (every column- and row-parallel projection and an untied
`lm_head`; not embeddings or norms) is stored as `<name>` int8 plus `<name>.scale`, one scale per output
channel in the model dtype (symmetric, w = q * scale), quantized whole before the split: column-parallel
ranks hold their rows' scales, row-parallel ranks all the scales.

Tensors are streamed: each arrives, is cast, quantized, split and appended to every rank's file at once,
so memory holds one tensor and its slices. The safetensors library writes only whole dictionaries, so
`StreamingSafetensorsFile` lays out the same format itself (a reserved, space-padded JSON header, then
the data); every file is re-opened with `safetensors.safe_open` once written. `config.json` is written
last, so an interrupted conversion never leaves a directory that loads.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch
from safetensors import safe_open

from gptserve.config import ModelConfig
from gptserve.errors import ModelLoadError
from gptserve.kernels.int8_weights import quantize_per_channel
from gptserve.loading.checkpoint import Checkpoint
from gptserve.parallel.sharding import COLUMN, ROW, check_tensor_parallel, shard_hf_tensor, shard_kind

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FORMAT_VERSION = 1
SECTION = "gptserve"
SCALE_SUFFIX = ".scale"
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.bool: "BOOL",
}
_HEADER_BYTES_PER_TENSOR = 256


def rank_file_name(rank: int, world_size: int) -> str:
    """`model-rank-{rank}-of-{world_size}.safetensors`."""
    return f"model-rank-{rank}-of-{world_size}.safetensors"


def is_quantized_weight(config: ModelConfig, name: str, tensor: torch.Tensor) -> bool:
    """Whether int8 conversion quantizes `name`: 2-D projection weights and an untied lm_head."""
    if tensor.dim() != 2 or not name.endswith(".weight"):
        return False
    return name == "lm_head.weight" or shard_kind(config, name) in (COLUMN, ROW)


def output_axis(config: ModelConfig, name: str) -> int:
    """The axis of the stored weight that indexes output channels (GPT-2's Conv1D stores [in, out])."""
    return 1 if config.architecture == "gpt2" and name != "lm_head.weight" else 0


def quantize_int8(weight: torch.Tensor, axis: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, per-output-channel scales in `weight`'s dtype) as the int8 layer quantizes at load;
    `axis` indexes the output channels of the stored layout."""
    q, scale = quantize_per_channel(weight if axis == 0 else weight.T)
    return (q if axis == 0 else q.T.contiguous()), scale


class StreamingSafetensorsFile:
    """A safetensors file written one tensor at a time (header space reserved up front)."""

    def __init__(self, path: Path, expected_tensors: int, metadata: dict[str, str]):
        self.path = path
        self.metadata = metadata
        self.reserved = -(-expected_tensors * _HEADER_BYTES_PER_TENSOR // 8) * 8 + 1024
        self.entries: dict[str, dict[str, Any]] = {}
        self.offset = 0
        self.file: IO[bytes] = open(path, "wb")  # noqa: SIM115 (closed by finish / abort)
        self.file.seek(8 + self.reserved)

    def add(self, name: str, tensor: torch.Tensor) -> int:
        """Append `tensor` as `name`; returns its byte count."""
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise ModelLoadError(f"tensor {name!r} has dtype {tensor.dtype}, which the format does not store")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self.file.write(memoryview(data))
        end = self.offset + data.nbytes
        self.entries[name] = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self.offset, end],
        }
        self.offset = end
        return data.nbytes

    def finish(self) -> None:
        """Write the header (moving the data if it outgrew the reserved space) and close the file."""
        header = json.dumps({"__metadata__": self.metadata, **self.entries}, separators=(",", ":")).encode()
        if len(header) <= self.reserved:
            self.file.seek(0)
            self.file.write(struct.pack("<Q", self.reserved) + header.ljust(self.reserved, b" "))
            self.file.close()
        else:
            self.file.close()
            self._rewrite(header)
        try:
            with safe_open(str(self.path), framework="pt") as f:
                f.keys()
        except Exception as error:
            raise ModelLoadError(f"{self.path} did not read back as safetensors: {error}") from error

    def abort(self) -> None:
        self.file.close()

    def _rewrite(self, header: bytes) -> None:
        header = header.ljust(-(-len(header) // 8) * 8, b" ")
        moved = self.path.with_suffix(".tmp")
        with open(self.path, "rb") as src, open(moved, "wb") as dst:
            dst.write(struct.pack("<Q", len(header)) + header)
            src.seek(8 + self.reserved)
            shutil.copyfileobj(src, dst, 16 << 20)
        moved.replace(self.path)


@dataclass
class ConversionStats:
    """What a conversion wrote."""

    tensors: int = 0  # source tensors converted
    bytes_written: int = 0  # tensor bytes over all rank files


class ConvertedWriter:
    """Builds one converted directory from a stream of (HF name, full tensor) pairs."""

    def __init__(
        self,
        directory: Path,
        hf_config: dict[str, Any],
        world_size: int,
        dtype: torch.dtype | None = None,
        quantization: str | None = None,
    ):
        if quantization not in (None, "int8"):
            raise ModelLoadError(f"unknown quantization {quantization!r}; only int8 is supported")
        self.directory = directory
        self.hf_config = {k: v for k, v in hf_config.items() if k != SECTION}
        self.config = ModelConfig.from_hf(self.hf_config)
        check_tensor_parallel(self.config, world_size)
        self.world_size = world_size
        self.dtype = dtype  # None: the dtype of the first floating tensor
        self.quantization = quantization
        self.stats = ConversionStats()
        per_rank = (self.config.num_layers * 24 + 16) * (2 if quantization else 1)
        self.files = [
            StreamingSafetensorsFile(
                directory / rank_file_name(rank, world_size),
                per_rank,
                {"format": "pt", "rank": str(rank), "tensor_parallel_size": str(world_size)},
            )
            for rank in range(world_size)
        ]

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Cast, quantize and split one full tensor and append each rank's slice to its file."""
        if tensor.is_floating_point():
            if self.dtype is None:
                self.dtype = tensor.dtype
            tensor = self._cast(name, tensor)
        parts = [(name, tensor)]
        scale_kind = None
        if self.quantization == "int8" and is_quantized_weight(self.config, name, tensor):
            q, scale = quantize_int8(tensor, output_axis(self.config, name))
            parts = [(name, q), (name + SCALE_SUFFIX, scale)]
            scale_kind = shard_kind(self.config, name)
        for rank, file in enumerate(self.files):
            for part_name, part in parts:
                if part_name.endswith(SCALE_SUFFIX) and scale_kind == ROW:
                    piece = part  # a row-parallel rank's rows are whole, so it needs every scale
                else:
                    piece = shard_hf_tensor(self.config, name, part, rank, self.world_size)
                self.stats.bytes_written += file.add(part_name, piece)
        self.stats.tensors += 1

    def finish(
        self, tokenizer: PreTrainedTokenizerBase | None = None, chat_template: str | None = None
    ) -> None:
        """Close the rank files, save the tokenizer, then write `config.json` (last: it marks completion)."""
        for file in self.files:
            file.finish()
        if tokenizer is not None:
            tokenizer.save_pretrained(str(self.directory))
        if chat_template:
            (self.directory / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
        dtype = self.dtype or torch.float32
        section = {
            "format_version": FORMAT_VERSION,
            "tensor_parallel_size": self.world_size,
            "dtype": DTYPE_NAMES[dtype],
            "quantization": self.quantization,
        }
        config = {**self.hf_config, SECTION: section}
        (self.directory / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    def abort(self) -> None:
        for file in self.files:
            file.abort()

    def _cast(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dtype == self.dtype:
            return tensor
        cast = tensor.to(self.dtype)
        if self.dtype == torch.float16 and not torch.isfinite(cast).all() and torch.isfinite(tensor).all():
            raise ModelLoadError(
                f"tensor {name!r} has values outside the fp16 range; convert with --dtype bf16"
            )
        return cast


def write_converted(
    checkpoint: Checkpoint,
    directory: Path,
    world_size: int,
    dtype: torch.dtype | None = None,
    quantization: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> ConversionStats:
    """Stream `checkpoint` into `directory` (which must exist and be empty) in the converted format.

    `progress` is called with each source tensor's element count. On error the rank files are closed
    and the exception propagates; the caller removes the directory.
    """
    writer = ConvertedWriter(directory, checkpoint.hf_config, world_size, dtype, quantization)
    try:
        for name, tensor in checkpoint.weights():
            writer.add(name, tensor)
            if progress is not None:
                progress(tensor.numel())
        writer.finish(checkpoint.tokenizer, checkpoint.chat_template)
    except BaseException:
        writer.abort()
        raise
    return writer.stats
