"""`StepInputs`: one engine step's packed batch as plain Python data.

The model runner builds it, runs it eagerly or replays it from a CUDA graph, and rank 0 sends it to the
other tensor-parallel ranks, which run the same forward pass on their shards.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StepInputs:
    """One step's packed batch as plain Python data: all a tensor-parallel rank needs to run the same
    forward pass on its shard (rank 0 broadcasts it before running the step itself)."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slot_mapping: list[int] = field(default_factory=list)
    decode_tables: list[list[int]] = field(default_factory=list)  # block table of each decode query
    decode_lens: list[int] = field(default_factory=list)
    # (query offset, query length, context length, the context's blocks) of each prefill chunk
    prefills: list[tuple[int, int, int, list[int]]] = field(default_factory=list)
    logits_rows: list[int] = field(default_factory=list)  # rows of the packed batch to compute logits for
    # the input ids are rank 0's samples, still on its device: every rank takes them from a broadcast
    tokens_on_device: bool = False
    copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) cache blocks, before the step
