"""The checkpoint every reader produces (`gptserve.loading.loader` picks the reader for a path).

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
from typing import TYPE_CHECKING, Any

import torch

from gptserve.config import ModelConfig
from gptserve.parallel.sharding import shard_hf_tensor

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
        config = ModelConfig.from_hf(self.hf_config)
        return ((n, shard_hf_tensor(config, n, t, rank, world_size)) for n, t in self.weights())
