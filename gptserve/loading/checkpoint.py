"""The checkpoint every reader produces, and `load_checkpoint`, which picks the reader for a path.

A `Checkpoint` is what the engine needs from a model source and nothing more: a Hugging Face style
config dictionary, a lazy stream of Hugging Face named weights, and the tokenizer with its chat
template. Weights come from a factory so that each pass re-opens the files and holds one tensor at a
time; the model copies each tensor into place and drops it. Tensors keep the dtype they are stored
in (GGUF ones are dequantized to float32); when the config ties the word embeddings, no
`lm_head.weight` is yielded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gptserve.errors import ModelLoadError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

WeightsFactory = Callable[[], Iterator[tuple[str, torch.Tensor]]]
RankWeightsFactory = Callable[[int, int], Iterator[tuple[str, torch.Tensor]]]


@dataclass
class Checkpoint:
    """A model source, read: config, weights (lazy), tokenizer and chat template."""

    hf_config: dict[str, Any]
    weights: WeightsFactory = field(repr=False)
    tokenizer: PreTrainedTokenizerBase | None = field(repr=False)
    chat_template: str | None = field(repr=False)
    source: str
    quantization: str | None = None  # storage type of the bulk of the weights, e.g. "Q4_1" for a GGUF file
    # (rank, world_size) -> that rank's Megatron slices under HF names, for sources stored pre-split
    # (FasterTransformer c-model, gptserve's converted format); None: slice `weights()` instead.
    rank_weights: RankWeightsFactory | None = field(default=None, repr=False)
    tensor_parallel_size: int = 1  # the world size the files are split for (1: not split)

    def weights_for_rank(self, rank: int, world_size: int) -> Iterator[tuple[str, torch.Tensor]]:
        """Rank `rank`'s slice of every weight in a world of `world_size` (`parallel.sharding` layout)."""
        if self.rank_weights is not None:
            return self.rank_weights(rank, world_size)
        if world_size == 1:
            return self.weights()
        from gptserve.config import ModelConfig
        from gptserve.parallel.sharding import shard_hf_tensor

        config = ModelConfig.from_hf(self.hf_config)
        return ((n, shard_hf_tensor(config, n, t, rank, world_size)) for n, t in self.weights())


def load_checkpoint(path: str | Path | None) -> Checkpoint:
    """Read a model: None -> the embedded default, a `.gguf` file, a gptserve converted directory, a
    FasterTransformer c-model directory, a mesh-transformer-jax slim checkpoint or an HF directory."""
    # The readers import this module for `Checkpoint`, so they are imported here, not at the top.
    from gptserve.loading.converted_dir import is_converted_dir, read_converted_checkpoint
    from gptserve.loading.default_model import default_model_path
    from gptserve.loading.ft_cmodel import is_ft_cmodel_dir, read_ft_checkpoint
    from gptserve.loading.gguf_file import read_gguf_checkpoint
    from gptserve.loading.hf_dir import read_hf_checkpoint
    from gptserve.loading.mtj_slim import is_mtj_slim_dir, read_mtj_checkpoint

    path = default_model_path() if path is None else Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {str(path)!r} does not exist")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return read_gguf_checkpoint(path)
        raise ModelLoadError(
            f"{str(path)!r} is a file but not a .gguf file; "
            "pass a .gguf file or a Hugging Face model directory (with config.json)"
        )
    if is_converted_dir(path):
        return read_converted_checkpoint(path)
    if is_ft_cmodel_dir(path):
        return read_ft_checkpoint(path)
    if is_mtj_slim_dir(path):
        return read_mtj_checkpoint(path)
    if (path / "config.json").is_file():
        return read_hf_checkpoint(path)
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    hint = f"; it holds GGUF files, pass one of them: {', '.join(ggufs)}" if ggufs else ""
    raise ModelLoadError(f"{str(path)!r} is a directory without config.json, so not a model directory{hint}")
