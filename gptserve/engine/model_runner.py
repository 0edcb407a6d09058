"""Runs one engine step on the model: packs the scheduled tokens, owns the KV cache tensors.

The packed batch holds decode tokens first (one query per sequence, attention batched over padded
block tables) and prefill chunks after them (attention per chunk). No sequence is padded to the
longest: the token dimension is the sum of the scheduled tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from gptserve.config import ModelConfig
from gptserve.engine.scheduler import ScheduledSeq
from gptserve.layers.attention import Attention, AttentionMetadata, PrefillChunk, attention_context


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of K and V that one token occupies across all layers."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * elem


class ModelRunner:
    """Owns the model and its paged KV cache; turns scheduled sequences into logits."""

    def __init__(
        self,
        model: nn.Module,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.model = model
        self.config = config
        self.block_size = block_size
        self.device = device
        self.layers: list[Attention] = [m for m in model.modules() if isinstance(m, Attention)]
        if len(self.layers) != config.num_layers:
            raise RuntimeError(
                f"model has {len(self.layers)} attention layers, config says {config.num_layers}"
            )
        for layer in self.layers:
            layer.allocate_cache(num_blocks, block_size, dtype, device)

    def _slots(self, block_ids: list[int], start: int, end: int) -> torch.Tensor:
        """Flat cache slots of token positions [start, end) of a sequence."""
        bs = self.block_size
        first, last = start // bs, (end - 1) // bs + 1
        blocks = torch.tensor(block_ids[first:last], dtype=torch.long)
        slots = (blocks[:, None] * bs + torch.arange(bs)).flatten()
        return slots[start - first * bs : end - first * bs]

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for layer in self.layers:
            layer.copy_blocks(src, dst)

    @torch.inference_mode()
    def execute(
        self, scheduled: list[ScheduledSeq], copies: list[tuple[int, int]]
    ) -> tuple[torch.Tensor, list[int]]:
        """Run the step. Returns float32 logits for the sampling entries, and their indices in `scheduled`."""
        self.copy_blocks(copies)
        order = sorted(range(len(scheduled)), key=lambda i: scheduled[i].num_new_tokens != 1)
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillChunk] = []
        logits_rows: list[int] = []
        sample_entries: list[int] = []
        # Plain Python ints, turned into tensors once: per-sequence tensor ops would cost more than the
        # whole one-sequence decode step's bookkeeping.
        for i in order:
            item = scheduled[i]
            seq, n = item.seq, item.num_new_tokens
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            offset = len(input_ids)
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            block_ids = seq.block_ids
            slot_mapping.extend(block_ids[p // bs] * bs + p % bs for p in range(start, end))
            if n == 1:
                decode_tables.append(block_ids[: (end - 1) // bs + 1])
                decode_lens.append(end)
            else:
                context = self._slots(block_ids, 0, end).to(self.device)
                prefills.append(PrefillChunk(offset, n, end, context))
            if item.sample:
                logits_rows.append(offset + n - 1)
                sample_entries.append(i)

        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=self.device),
            num_decode_tokens=len(decode_lens),
            prefills=prefills,
        )
        if decode_lens:
            self._decode_metadata(meta, decode_tables, decode_lens)

        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        with attention_context(meta):
            hidden = self.model(ids, pos)
        if not logits_rows:
            return torch.empty(0, self.config.vocab_size), []
        if len(logits_rows) != len(input_ids):  # a decode-only step samples every row as it stands
            hidden = hidden[torch.tensor(logits_rows, device=self.device)]
        logits = self.model.compute_logits(hidden).float()
        return logits, sample_entries

    def _decode_metadata(self, meta: AttentionMetadata, tables: list[list[int]], lens: list[int]) -> None:
        """Block tables padded to the longest; a pad repeats the sequence's own last block, which the
        attention masks out by context length."""
        width = max(len(t) for t in tables)
        padded = [t + t[-1:] * (width - len(t)) for t in tables]
        meta.decode_blocks = torch.tensor(padded, dtype=torch.long, device=self.device)
        meta.decode_context_lens = lens
