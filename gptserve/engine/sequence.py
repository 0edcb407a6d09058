"""Requests and their sequences: token ids, KV block tables and per-sequence generation state.

A request starts with one sequence holding the prompt. When its prompt has been computed, a request
with `n > 1` forks into n sequences that share the prompt's KV blocks; beam search forks and prunes
its beams every step. Preemption frees every block of a request and recomputes it later.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from gptserve.outputs import TokenLogprob
from gptserve.sampling_params import SamplingParams

_seq_ids = itertools.count()


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One token stream and the KV blocks that hold it."""

    token_ids: list[int]
    num_prompt_tokens: int
    generator: torch.Generator | None = None
    index: int = 0  # position among the request's outputs
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of full, computed blocks
    cumulative_logprob: float = 0.0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_reported_tokens: int = 0  # output tokens the engine core has reported
    finish_reported: bool = False  # the engine core has reported how it ended
    # Beam search: a live beam's cumulative processed score (what beams are ranked by); the
    # length-normalised score once the beam has finished.
    beam_score: float = 0.0
    # The engine's sampling row for this sequence when it never changes (no history read, nothing
    # forbidden), built once instead of every step.
    sampling_row: Any = None
    # Structured output: where the output stands in its grammar (engine.grammar.GrammarState), or None.
    grammar: Any = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def fork(self, index: int, generator: torch.Generator | None) -> Sequence:
        """A copy sharing history (the caller takes references on the shared blocks)."""
        return Sequence(
            token_ids=list(self.token_ids),
            num_prompt_tokens=self.num_prompt_tokens,
            generator=generator,
            index=index,
            num_computed_tokens=self.num_computed_tokens,
            block_ids=list(self.block_ids),
            block_hashes=list(self.block_hashes),
            cumulative_logprob=self.cumulative_logprob,
            logprobs=list(self.logprobs),
            grammar=None if self.grammar is None else self.grammar.copy(),
        )


@dataclass(eq=False)
class Request:
    """A user request: a prompt, its sampling parameters and the sequences generated for it."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    forked: bool = False  # the prompt sequence has been split into n samples / beams
    finished_beams: list[Sequence] = field(default_factory=list)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_preemptions: int = 0
    first_token_time: float | None = None
    error: str | None = None
    num_prompt_logprobs: int = 0  # prompt positions whose next token's log-prob has been reported
    new_prompt_logprobs: list[TokenLogprob] | None = None  # computed this step, not yet reported
    beam_state: Any = None  # engine.beam_search.BeamState of a beam-search request

    @property
    def live_seqs(self) -> list[Sequence]:
        """The sequences still generating (read-only: a one-sequence request may hand back `seqs`)."""
        seqs = self.seqs
        if len(seqs) == 1:  # the common case, asked several times per sequence and step
            return seqs if seqs[0].finish_reason is None else []
        return [s for s in seqs if s.finish_reason is None]

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
