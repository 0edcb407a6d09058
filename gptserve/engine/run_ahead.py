"""Asynchronous scheduling: launching the next decode step from this step's sampled tokens on the device.

When every running sequence samples in this step, the next step's input ids are exactly the tokens being
sampled, so that step can be launched before they reach the host; the host then appends tokens, checks
stops and builds outputs while the GPU runs it. The engine core samples the launched step on its next
call instead of scheduling one.

Rows that must run synchronously (the step is not launched ahead when any of them is in the batch):
- a prompt chunk that does not end at its last token (it has nothing to sample from);
- a sequence whose sampling reads its token history (repetition, frequency or presence penalties, bad
  words) or forbids tokens for now (`min_tokens` not yet reached): its next row depends on the token the
  host has not seen yet;
- a sequence with structured output: its next mask depends on this step's token, which its grammar must
  accept on the host first;
- a batch in which waiting requests could be admitted at the next step (they would wait a step longer).
A sequence that ends at this step (EOS, a stop token or string, an abort) wastes its row of the step
ahead, whose token is dropped; one that ends by length is left out of it beforehand.
"""

from __future__ import annotations

import torch

from gptserve.config import SchedulerConfig
from gptserve.engine.model_runner import ModelRunner
from gptserve.engine.scheduler import ScheduledSeq, Scheduler
from gptserve.engine.sequence import Request, Sequence
from gptserve.engine.step_inputs import LogitsLayout


class RunAhead:
    """Decides whether the next decode step may run ahead, launches it, and holds it until sampled."""

    def __init__(self, config: SchedulerConfig, scheduler: Scheduler, runner: ModelRunner):
        self.config = config
        self.scheduler = scheduler
        self.kv = scheduler.kv
        self.runner = runner
        self.num_launched = 0
        # The step in flight: (scheduled, logits, what the logits rows are)
        self._launched: tuple[list[ScheduledSeq], torch.Tensor, LogitsLayout] | None = None

    @property
    def pending(self) -> bool:
        return self._launched is not None

    def take(self) -> tuple[list[ScheduledSeq], torch.Tensor, LogitsLayout] | None:
        """The step launched ahead, if any (handed over once)."""
        launched, self._launched = self._launched, None
        return launched

    def allowed(self, scheduled: list[ScheduledSeq], targets: list[tuple[Request, Sequence]]) -> bool:
        """Whether the next step may be launched from this step's tokens on the device: every running
        sequence samples now, none reads token history, and no waiting request could be admitted."""
        if not self.config.async_scheduling:
            return False
        if len(targets) != len(scheduled) or len(targets) > self.config.max_num_batched_tokens:
            return False
        if any(not item.sample for item in scheduled):
            return False
        if self.scheduler.num_running_seqs() != len(targets):
            return False
        if self.scheduler.waiting and not self._admits_none_next(targets):
            return False
        return all(seq.sampling_row is not None for _, seq in targets)

    def _admits_none_next(self, targets: list[tuple[Request, Sequence]]) -> bool:
        """With requests waiting, whether the next step would admit none of them anyway: the running set
        is at `max_num_seqs` and no sequence reaches its length limit at this step. (A sequence that ends
        on a stop token frees its place one step later than it would without the step run ahead.)"""
        if len(targets) < self.config.max_num_seqs:
            return False
        return not any(self.scheduler.ends_with_next_token(request, seq) for request, seq in targets)

    def launch(self, targets: list[tuple[Request, Sequence]], tokens: torch.Tensor) -> bool:
        """Launch the decode step that follows this one for every sequence that will not end by length,
        its input ids taken from `tokens` (this step's samples, on the device). False if none was."""
        keep: list[int] = []
        items: list[ScheduledSeq] = []
        for i, (request, seq) in enumerate(targets):
            if self.scheduler.ends_with_next_token(request, seq):
                continue
            keep.append(i)
            items.append(ScheduledSeq(seq, request, 1, True))
        if not items:
            return False
        if not self.kv.can_allocate(self.kv.blocks_needed_for((item.seq, 1) for item in items)):
            return False
        copies: list[tuple[int, int]] = []
        for item in items:
            self.kv.allocate(item.seq, 1, copies)
        if len(keep) < len(targets):
            tokens = tokens[torch.tensor(keep, device=tokens.device)]
        self.num_launched += 1
        logits, layout = self.runner.execute(items, copies, tokens)
        self._launched = (items, logits, layout)
        return True
