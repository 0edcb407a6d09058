"""Token embeddings and the output head, vocab-parallel where there are several ranks: each rank then holds a
contiguous block of vocabulary rows.

The vocabulary is padded to a multiple of the world size (`sharding.padded_vocab_size`), so every rank
holds the same number of rows. The embedding looks up the ids in its block, zeroes the rest and sums
the ranks' rows with one all-reduce. The head computes the logits of its block and all-gathers them, so
every rank holds the full [tokens, vocab] logits and the padding columns are dropped.

In a world of one they are an `nn.Embedding` and a dense `Linear`. A vocab-parallel head is no
`LinearLayer`: its bias is split with the vocabulary and gathered with the logits, and nothing fuses
after it.
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from gptserve.layers.linear import Linear, uninitialized
from gptserve.parallel import parallel_state
from gptserve.parallel.sharding import padded_vocab_size

L = TypeVar("L", bound=nn.Linear)


def embedding(vocab_size: int, hidden_size: int) -> nn.Embedding:
    """An uninitialised `nn.Embedding`, built directly: random init on the meta device costs a slow import."""
    return nn.Embedding(vocab_size, hidden_size, _weight=torch.empty(vocab_size, hidden_size))


def vocab_parallel_embedding(vocab_size: int, hidden_size: int) -> nn.Module:
    """This rank's block of the token embedding (an uninitialised `nn.Embedding` in a world of one)."""
    world = parallel_state.world_size()
    if world == 1:
        return embedding(vocab_size, hidden_size)
    return VocabParallelEmbedding(padded_vocab_size(vocab_size, world) // world, hidden_size)


def parallel_lm_head(emb: nn.Module, vocab_size: int, tied: bool, bias: bool = False) -> nn.Module:
    """The output projection over `emb`'s vocabulary block (a dense `Linear` in a world of one); it
    shares `emb`'s weight when `tied`."""
    if parallel_state.world_size() == 1:
        return _head(Linear, emb, tied, bias)
    head = _head(ParallelLMHead, emb, tied, bias)
    head.vocab_size = vocab_size
    return head


def _head(cls: type[L], emb: nn.Module, tied: bool, bias: bool) -> L:
    """A `cls` over `emb`'s rows: with a weight of its own, or sharing the embedding's weight when tied."""
    rows, hidden = emb.weight.shape
    if not tied:
        return uninitialized(cls, hidden, rows, bias=bias)
    with torch.device("meta"):  # the weight is replaced at once: allocate nothing
        head = cls(hidden, rows, bias=False)
    head.weight = emb.weight
    if bias:
        head.bias = nn.Parameter(torch.empty(rows, dtype=emb.weight.dtype, device=emb.weight.device))
    return head


class VocabParallelEmbedding(nn.Module):
    """Rows [rank * n, (rank + 1) * n) of the embedding; ids outside them contribute zeros before the sum."""

    def __init__(self, num_local: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_local, hidden_size), requires_grad=False)
        self.start = parallel_state.rank() * num_local
        self.num_local = num_local

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_local)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        x.masked_fill_(outside[..., None], 0)
        return parallel_state.all_reduce(x)


class ParallelLMHead(nn.Linear):
    """Logits of this rank's vocabulary block, all-gathered into [tokens, vocab_size] on every rank."""

    vocab_size: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gather_logits(super().forward(x), self.vocab_size)

    def wrap_quantized(self, quantized: nn.Module) -> nn.Module:
        """Keep the gather around `quantized`, this head's weight-only form."""
        return GatheredHead(quantized, self.vocab_size)


class GatheredHead(nn.Module):
    """A quantized vocab-parallel head: its block's logits, gathered."""

    def __init__(self, inner: nn.Module, vocab_size: int):
        super().__init__()
        self.inner = inner
        self.vocab_size = vocab_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gather_logits(self.inner(x), self.vocab_size)


def gather_logits(local: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[tokens, vocab block] on each rank -> [tokens, vocab_size], the padding columns dropped."""
    return parallel_state.all_gather(local, dim=-1)[..., :vocab_size]
