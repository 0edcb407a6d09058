"""Runs one engine step on the model: packs the scheduled tokens, owns the KV cache tensors and the CUDA
graphs its steps replay.

The packed batch holds decode tokens first (one query per sequence, attention batched over their block
tables) and prefill chunks after them (on CUDA in half precision one varlen attention call for all
chunks; otherwise attention per chunk). No sequence is padded to the longest: the token dimension is the
sum of the scheduled tokens.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch
from torch import nn

from gptserve.config import ModelConfig
from gptserve.engine.cuda_graphs import StepGraphs, capture_step_graphs
from gptserve.engine.scheduler import ScheduledSeq
from gptserve.engine.step_inputs import LogitsLayout, StepInputs
from gptserve.layers.attention import Attention, AttentionMetadata, PrefillChunk, attention_context
from gptserve.parallel import parallel_state


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
        kv_dtype: torch.dtype | None = None,
    ):
        self.model = model
        self.config = config
        self.block_size = block_size
        self.device = device
        self.dtype = dtype  # the activations'; the KV cache holds `kv_dtype` (default: the same)
        self.publish: Callable[[StepInputs], None] | None = None  # sends each step to the other TP ranks
        self.graphs: StepGraphs | None = None  # steps replayed from CUDA graphs, once `capture_graphs` ran
        self.layers: list[Attention] = [m for m in model.modules() if isinstance(m, Attention)]
        if len(self.layers) != config.num_layers:
            raise RuntimeError(
                f"model has {len(self.layers)} attention layers, config says {config.num_layers}"
            )
        for layer in self.layers:
            layer.allocate_cache(num_blocks, block_size, kv_dtype or dtype, device)

    def capture_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        """Capture CUDA graphs of the decode step for batches of up to `max_num_seqs` sequences (block
        tables wide enough for `max_model_len`) and, in half precision, of a lone fresh prompt's step;
        `run` replays them for every step they fit. Under tensor parallelism every rank captures the same
        graphs, so their collectives meet."""
        self.graphs = capture_step_graphs(
            self.model, self.device, self.dtype, self.block_size, max_num_seqs, max_model_len
        )

    def release(self) -> None:
        """Give the KV cache and CUDA graphs back to the allocator; the runner cannot run afterwards."""
        self.graphs = None
        for layer in self.layers:
            layer.release_cache()
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()

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

    def execute(
        self,
        scheduled: list[ScheduledSeq],
        copies: list[tuple[int, int]],
        input_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, LogitsLayout]:
        """Run the step. Returns float32 logits and what each of their rows is for. `input_ids` on the
        device (decode tokens only, one per scheduled sequence, in order: the previous step's samples) let
        a step start before the host has its tokens."""
        step, layout = self.prepare(scheduled, copies, tokens_on_device=input_ids is not None)
        if self.publish is not None:
            self.publish(step)
        return self.run(step, None if input_ids is None else input_ids.contiguous()), layout

    def prepare(
        self, scheduled: list[ScheduledSeq], copies: list[tuple[int, int]], tokens_on_device: bool = False
    ) -> tuple[StepInputs, LogitsLayout]:
        """Pack the scheduled tokens; returns the step and what each of its logits rows is for. With
        `tokens_on_device` (decode tokens only) the input ids are left 0, to be filled on the device. A
        prompt whose request asked for `prompt_logprobs` gets a logits row for every position that
        predicts a prompt token (such steps run eagerly: the graphs compute one row per sequence)."""
        order = sorted(range(len(scheduled)), key=lambda i: scheduled[i].num_new_tokens != 1)
        bs = self.block_size
        step = StepInputs(copies=copies, tokens_on_device=tokens_on_device)
        layout = LogitsLayout()
        rows = step.logits_rows
        # Plain Python ints, turned into tensors once: per-sequence tensor ops would cost more than the
        # whole one-sequence decode step's bookkeeping.
        for i in order:
            item = scheduled[i]
            seq, n = item.seq, item.num_new_tokens
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            offset = len(step.input_ids)
            block_ids = seq.block_ids
            if n == 1:  # a decode token: the common case, kept to a few appends
                step.input_ids.append(0 if tokens_on_device else seq.token_ids[start])
                step.positions.append(start)
                step.slot_mapping.append(block_ids[start // bs] * bs + start % bs)
                step.decode_tables.append(block_ids[: start // bs + 1])
                step.decode_lens.append(end)
            else:
                step.input_ids.extend(seq.token_ids[start:end])
                step.positions.extend(range(start, end))
                step.slot_mapping.extend(block_ids[p // bs] * bs + p % bs for p in range(start, end))
                step.prefills.append((offset, n, end, block_ids[: (end - 1) // bs + 1]))
            if item.request.params.prompt_logprobs is not None and seq.num_output_tokens == 0:
                last = min(end, seq.num_prompt_tokens - 1)  # the last prompt position predicts an output
                if start < last:
                    layout.prompt_spans.append((i, len(rows), last - start))
                    rows.extend(range(offset, offset + last - start))
            if item.sample:
                layout.sample_rows.append(len(rows))
                layout.sample_entries.append(i)
                rows.append(offset + n - 1)
        return step, layout

    @torch.inference_mode()
    def run(self, step: StepInputs, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Run the model on a packed step; float32 logits of its `logits_rows`. `input_ids` on the
        device, when given, stand in for `step.input_ids`."""
        self.copy_blocks(step.copies)
        if step.tokens_on_device and parallel_state.world_size() > 1:  # rank 0 sends, the others receive
            if input_ids is None:
                input_ids = torch.empty(len(step.input_ids), dtype=torch.long, device=self.device)
            parallel_state.broadcast_tensor(input_ids)
        if self.graphs is not None and self.graphs.can_replay(step):
            return self.graphs.replay(step, input_ids)
        prefills = [
            PrefillChunk(offset, n, end, self._slots(blocks, 0, end).to(self.device))
            for offset, n, end, blocks in step.prefills
        ]
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(step.slot_mapping, dtype=torch.long, device=self.device),
            num_decode_tokens=len(step.decode_lens),
            prefills=prefills,
        )
        if step.decode_lens:
            self._decode_metadata(meta, step.decode_tables, step.decode_lens)

        if input_ids is None:
            ids = torch.tensor(step.input_ids, dtype=torch.long, device=self.device)
        else:
            ids = input_ids
        pos = torch.tensor(step.positions, dtype=torch.long, device=self.device)
        with attention_context(meta):
            hidden = self.model(ids, pos)
        rows = step.logits_rows
        if not rows:
            return torch.empty(0, self.config.vocab_size)
        if len(rows) != len(step.input_ids):  # a decode-only step samples every row as it stands
            hidden = hidden[torch.tensor(rows, device=self.device)]
        return self.model.compute_logits(hidden).float()

    def _decode_metadata(self, meta: AttentionMetadata, tables: list[list[int]], lens: list[int]) -> None:
        """Block tables padded to the longest; a pad repeats the sequence's own last block, which the
        attention masks out by context length."""
        width = max(len(t) for t in tables)
        padded = [t + t[-1:] * (width - len(t)) for t in tables]
        meta.decode_blocks = torch.tensor(padded, dtype=torch.long, device=self.device)
        meta.decode_context_lens = lens
