"""A model runner's step graphs: decode steps, and single fresh prompts, replayed from CUDA graphs, one
graph per size of a bounded set.

A decode-only step of B sequences runs the graph of the smallest captured size >= B. Every input the
graph reads sits in one static int64 device buffer per size (token ids, positions, cache slots, context
lengths, block tables), filled by a single host-to-device copy before the replay. Padding is explicit:
a padding row has token 0 at position 0, cache slot -1 (the KV write skips it) and context length 0
(the attention kernel writes zeros), and its logits are dropped. Block tables are as wide as the
longest sequence allowed (`max_model_len`), so one graph serves every context length; a step fills
only the columns its sequences use.

In half precision a step that is one whole prompt (or a prompt's first chunk) with nothing cached before
it and nothing else scheduled, the usual first step of a lone request, replays a prefill graph of the
smallest captured token count that holds it: the prompt is the first sequence of a FlashAttention
varlen call and the padding tokens a second one (cache slot -1), so they never mix. This takes the
per-kernel launch cost out of the time to first token.

Other steps (mixed prefill and decode, several prompts, a cached prefix, more sequences than the largest
graph) run eagerly. The model runner owns its `StepGraphs`: it has them captured once its KV cache is
allocated, and asks them to replay each step they fit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gptserve.engine.step_inputs import StepInputs
from gptserve.layers.attention import AttentionMetadata, VarlenPrefill, attention_context
from gptserve.parallel import parallel_state

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
PREFILL_TOKEN_COUNTS = (32, 64, 128, 256, 512)


class _DecodeGraph:
    """One captured decode step: its static input buffer, the views the model reads, its logits."""

    def __init__(self, batch: int, width: int, device: torch.device):
        self.batch, self.width = batch, width
        self.inputs = torch.zeros(batch * (4 + width), dtype=torch.long, device=device)
        ids, pos, slots, lens, tables = self.inputs.split([batch, batch, batch, batch, batch * width])
        self.ids, self.pos, self.slots, self.lens = ids, pos, slots, lens
        self.tables = tables.view(batch, width)
        self.graph = torch.cuda.CUDAGraph()
        self.logits: torch.Tensor | None = None

    def metadata(self) -> AttentionMetadata:
        meta = AttentionMetadata(slot_mapping=self.slots, num_decode_tokens=self.batch)
        meta.decode_blocks = self.tables
        meta.decode_context_lens_device = self.lens
        return meta

    def load(self, step: StepInputs) -> None:
        """Copy the step's inputs into the graph's buffers, padded to this graph's batch.

        Only the block-table columns the step uses are copied: entries left from earlier steps beyond a
        sequence's own blocks are never read, since the attention stops at its context length. A 512-row
        step with short contexts copies a few thousand ints instead of 512 x `width`."""
        n = len(step.input_ids)
        pad = self.batch - n
        flat = step.input_ids + [0] * pad
        flat += step.positions + [0] * pad
        flat += step.slot_mapping + [-1] * pad
        flat += step.decode_lens + [0] * pad
        self.inputs[: 4 * self.batch].copy_(torch.tensor(flat, dtype=torch.long), non_blocking=True)
        tables = step.decode_tables
        used = max(len(table) for table in tables)
        rows = [table + [0] * (used - len(table)) for table in tables]
        self.tables[:n, :used].copy_(torch.tensor(rows, dtype=torch.long), non_blocking=True)


class _PrefillGraph:
    """One captured prefill step of up to `tokens` tokens of one fresh sequence."""

    def __init__(self, tokens: int, device: torch.device):
        self.tokens = tokens
        # ids, positions, slots, then [prompt length, logits row]
        self.inputs = torch.zeros(3 * tokens + 2, dtype=torch.long, device=device)
        self.ids, self.pos, self.slots, self.length, self.row = self.inputs.split(
            [tokens, tokens, tokens, 1, 1]
        )
        self.cu = torch.tensor([0, tokens, tokens], dtype=torch.int32, device=device)
        self.graph = torch.cuda.CUDAGraph()
        self.logits: torch.Tensor | None = None

    def metadata(self) -> AttentionMetadata:
        meta = AttentionMetadata(slot_mapping=self.slots, num_decode_tokens=0)
        meta.derived[("varlen",)] = VarlenPrefill(self.cu, self.cu, self.tokens, self.tokens, None)
        return meta

    def host_inputs(self, step: StepInputs) -> list[int]:
        n = len(step.input_ids)
        pad = self.tokens - n
        return (
            step.input_ids
            + [0] * pad
            + step.positions
            + [0] * pad
            + step.slot_mapping
            + [-1] * pad
            + [n, n - 1]
        )


class StepGraphs:
    """Captures the model's decode step for each batch size, and its lone-prompt prefill step for each
    token count, and replays them for matching steps."""

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        block_size: int,
        batch_sizes: list[int],
        max_model_len: int,
        prefill_sizes: tuple[int, ...] = (),
    ):
        self.model = model
        self.device = device
        self.width = -(-max_model_len // block_size)
        self.batch_sizes = sorted(set(batch_sizes))
        self.decode_graphs: dict[int, _DecodeGraph] = {}
        self.prefill_graphs: dict[int, _PrefillGraph] = {}
        self.prefill_sizes = list(prefill_sizes)
        self.replays = {"decode": 0, "prefill": 0}  # steps served from graphs, by kind
        # Smallest captured size holding b sequences, for every b up to the largest.
        self._size_for = [0] * (self.batch_sizes[-1] + 1)
        size = 0
        for b in range(self.batch_sizes[-1], 0, -1):
            if b in self.batch_sizes:
                size = b
            self._size_for[b] = size

    @property
    def max_batch(self) -> int:
        return self.batch_sizes[-1]

    @torch.inference_mode()
    def capture(self) -> float:
        """Capture every size, largest first so the smaller ones reuse its memory pool; seconds taken."""
        start = time.perf_counter()
        device = self.device
        pool = None
        stream = torch.cuda.Stream(device)
        # Under tensor parallelism the communication library's watchdog thread queries CUDA events while
        # this thread captures; only this thread's calls must keep off the capture.
        mode = "thread_local" if parallel_state.world_size() > 1 else "global"
        for batch in reversed(self.batch_sizes):
            graph = _DecodeGraph(batch, self.width, device)
            graph.lens.fill_(1)  # warm-up and capture attend to one cached token (block 0)
            graph.logits = self._record(graph.graph, lambda g=graph: self._forward(g), pool, stream, mode)
            pool = graph.graph.pool()
            self.decode_graphs[batch] = graph
        for tokens in reversed(self.prefill_sizes):
            graph = _PrefillGraph(tokens, device)
            graph.length.fill_(tokens)
            graph.row.fill_(tokens - 1)
            graph.slots.fill_(-1)  # warm-up and capture write nothing to the cache
            graph.logits = self._record(
                graph.graph, lambda g=graph: self._prefill_forward(g), pool, stream, mode
            )
            self.prefill_graphs[tokens] = graph
        torch.cuda.synchronize(device)
        return time.perf_counter() - start

    def _record(
        self,
        cuda_graph: torch.cuda.CUDAGraph,
        forward: Callable[[], torch.Tensor],
        pool: Any,
        stream: torch.cuda.Stream,
        mode: str,
    ) -> torch.Tensor:
        """Run `forward` once on `stream` (compiling kernels and setting up cuBLAS outside the capture),
        then capture it into `cuda_graph`; returns the captured output."""
        device = self.device
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            forward()
        torch.cuda.current_stream(device).wait_stream(stream)
        torch.cuda.synchronize(device)
        with torch.cuda.graph(cuda_graph, pool=pool, stream=stream, capture_error_mode=mode):
            return forward()

    def _forward(self, graph: _DecodeGraph) -> torch.Tensor:
        model = self.model
        with attention_context(graph.metadata()):
            hidden = model(graph.ids, graph.pos)
        return model.compute_logits(hidden).float()

    def _prefill_forward(self, graph: _PrefillGraph) -> torch.Tensor:
        graph.cu[1:2].copy_(graph.length)  # the prompt ends where the padding sequence starts
        model = self.model
        with attention_context(graph.metadata()):
            hidden = model(graph.ids, graph.pos)
        return model.compute_logits(hidden[graph.row]).float()

    def _prefill_size(self, step: StepInputs) -> int | None:
        """The captured token count for a step that is one fresh prompt chunk alone, else None."""
        if not self.prefill_sizes or step.decode_lens or len(step.prefills) != 1:
            return None
        _, n, context, _ = step.prefills[0]
        if context != n or n > self.prefill_sizes[-1] or step.logits_rows != [n - 1]:
            return None
        return next(size for size in self.prefill_sizes if size >= n)

    def can_replay(self, step: StepInputs) -> bool:
        n = len(step.input_ids)
        if self._prefill_size(step) is not None:
            return True
        return (
            0 < n <= self.max_batch
            and not step.prefills
            and len(step.decode_lens) == n
            and len(step.logits_rows) == n
            and max(len(t) for t in step.decode_tables) <= self.width
        )

    def replay(self, step: StepInputs, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits [rows, vocab] of a step that `can_replay`, from its graph; `input_ids` on the
        device stand in for `step.input_ids` (a decode step launched ahead of its tokens)."""
        n = len(step.input_ids)
        size = self._prefill_size(step)
        if size is not None:
            prefill = self.prefill_graphs[size]
            prefill.inputs.copy_(torch.tensor(prefill.host_inputs(step), dtype=torch.long), non_blocking=True)
            prefill.graph.replay()
            self.replays["prefill"] += 1
            return prefill.logits.clone()
        graph = self.decode_graphs[self._size_for[n]]
        graph.load(step)
        if input_ids is not None:
            graph.ids[:n].copy_(input_ids)
        graph.graph.replay()
        self.replays["decode"] += 1
        return graph.logits[:n].clone()


def capture_step_graphs(
    model: nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    block_size: int,
    max_num_seqs: int,
    max_model_len: int,
    batch_sizes: tuple[int, ...] | None = None,
) -> StepGraphs:
    """Capture the decode step of `model` (activations in `dtype`, KV cache in blocks of `block_size`) for
    the batch sizes up to `max_num_seqs`, and in half precision its lone-prompt prefill step for the token
    counts below `max_model_len`; logs what it did."""
    sizes = [b for b in (batch_sizes or DEFAULT_BATCH_SIZES) if b <= max_num_seqs]
    if not sizes or sizes[-1] < min(max_num_seqs, DEFAULT_BATCH_SIZES[-1]):
        sizes.append(min(max_num_seqs, DEFAULT_BATCH_SIZES[-1]))
    # Prefill graphs use FlashAttention's varlen kernel, which takes half precision only.
    half = dtype in (torch.float16, torch.bfloat16)
    prefill = tuple(n for n in PREFILL_TOKEN_COUNTS if n < max_model_len) if half else ()
    graphs = StepGraphs(model, device, block_size, sizes, max_model_len, prefill)
    before = torch.cuda.memory_allocated(device)
    seconds = graphs.capture()
    logger.info(
        "CUDA graphs: decode step captured for batch sizes %s (block tables %d wide), a lone fresh "
        "prompt for token counts %s, in %.1f s, %.0f MiB; other steps run eagerly",
        ",".join(map(str, graphs.batch_sizes)),
        graphs.width,
        ",".join(map(str, prefill)) or "none",
        seconds,
        (torch.cuda.memory_allocated(device) - before) / (1 << 20),
    )
    return graphs
