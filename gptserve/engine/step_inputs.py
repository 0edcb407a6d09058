"""`StepInputs`: one engine step's packed batch as plain Python data, and `LogitsLayout`: which rows of
the step's logits are what.

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


@dataclass
class LogitsLayout:
    """What each row of a step's logits is for: the next token of a sequence that samples, or the
    log-probabilities of prompt tokens (a request that asked for `prompt_logprobs`)."""

    sample_entries: list[int] = field(default_factory=list)  # per sampling row: its index in `scheduled`
    sample_rows: list[int] = field(default_factory=list)  # per sampling row: its row of the logits
    # (index in `scheduled`, first logits row, rows): rows whose logits predict the next prompt tokens
    prompt_spans: list[tuple[int, int, int]] = field(default_factory=list)
