"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step has a token budget (`max_num_batched_tokens`). Running requests come first (one token per
decoding sequence, or the next chunk of a prompt), then waiting requests are admitted in arrival
order, their prompts chunked to fit the budget. When KV blocks run out, the most recently admitted
running request is preempted: its blocks are freed and it recomputes later (its own blocks often
come back from the prefix cache). All sequences of a request step together, so n-way samples and
beams always reach their sampling point in the same step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from gptserve.config import SchedulerConfig
from gptserve.engine.kv_cache_manager import KVCacheManager
from gptserve.engine.sequence import Request, RequestStatus, Sequence


@dataclass
class ScheduledSeq:
    """`num_new_tokens` tokens of `seq` to compute; `sample` when they end at its last token."""

    seq: Sequence
    request: Request
    num_new_tokens: int
    sample: bool


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    failed: list[Request] = field(default_factory=list)  # can never fit in the KV cache

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    """Owns the waiting queue and the running set."""

    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def num_running_seqs(self) -> int:
        return sum(len(r.live_seqs) for r in self.running)

    def _plan(self, request: Request, budget: int) -> list[ScheduledSeq]:
        """Tokens to compute for each live sequence of `request` within `budget`.

        If every sequence can reach its last token, all of them sample. Otherwise each advances at
        most to one token short of its end, so that they still sample together later.
        """
        seqs = request.live_seqs
        if len(seqs) == 1:  # one sequence: it reaches its last token if the budget allows
            seq = seqs[0]
            n = len(seq.token_ids) - seq.num_computed_tokens
            if n <= budget:
                return [ScheduledSeq(seq, request, n, True)]
            return [ScheduledSeq(seq, request, budget, False)]
        remaining = [s.num_uncomputed_tokens for s in seqs]
        if sum(remaining) <= budget:
            return [ScheduledSeq(s, request, r, True) for s, r in zip(seqs, remaining)]
        plan = []
        for s, r in zip(seqs, remaining):
            n = min(r - 1, budget)
            if n > 0:
                plan.append(ScheduledSeq(s, request, n, False))
                budget -= n
        return plan

    def _blocks_needed(self, plan: list[ScheduledSeq]) -> int:
        needed = 0
        for p in plan:  # a loop: plans are mostly one sequence long, where a generator costs more
            needed += self.kv.blocks_needed(p.seq, p.num_new_tokens)
        return needed

    def _allocate(self, plan: list[ScheduledSeq], out: SchedulerOutput) -> None:
        for p in plan:
            self.kv.allocate(p.seq, p.num_new_tokens, out.block_copies)
        out.scheduled.extend(plan)

    def preempt(self, request: Request) -> None:
        """Free every block of `request` and put it back at the head of the queue."""
        for seq in request.live_seqs:
            self.kv.free(seq)
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        scheduled_running: list[Request] = []
        while self.running and budget > 0:
            request = self.running.pop(0)
            plan = self._plan(request, budget)
            needed = self._blocks_needed(plan)
            while not self.kv.can_allocate(needed) and self.running:
                victim = self.running.pop()
                self.preempt(victim)
                out.preempted.append(victim)
                needed = self._blocks_needed(plan)  # the victim may have shared a block with the plan
            if not self.kv.can_allocate(needed):
                if not scheduled_running:  # alone and still too big: it can never run
                    self._fail(request, out)
                else:
                    self.preempt(request)
                    out.preempted.append(request)
                break
            self._allocate(plan, out)
            scheduled_running.append(request)
            for p in plan:
                budget -= p.num_new_tokens
        self.running = scheduled_running + self.running

        if out.preempted:  # blocks are short: let the running requests drain first
            return out
        num_seqs = self.num_running_seqs()
        while self.waiting and budget > 0:
            request = self.waiting[0]
            live = request.live_seqs
            if num_seqs + len(live) > self.config.max_num_seqs and self.running:
                break
            for seq in live:
                if seq.num_computed_tokens == 0 and not seq.block_ids:
                    hit = self.kv.match_prefix(seq)
                    if seq.num_output_tokens == 0 and seq.index == 0:
                        request.num_cached_tokens = hit
            plan = self._plan(request, budget)
            if not self.kv.can_allocate(self._blocks_needed(plan)):
                for seq in live:  # give back the prefix blocks until it can be admitted
                    self.kv.free(seq)
                if not self.running and not out.scheduled:
                    self.waiting.popleft()
                    self._fail(request, out)
                    continue
                break
            self.waiting.popleft()
            self._allocate(plan, out)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            num_seqs += len(live)
            budget -= sum(p.num_new_tokens for p in plan)
        return out

    def _fail(self, request: Request, out: SchedulerOutput) -> None:
        for seq in request.live_seqs:
            self.kv.free(seq)
        request.error = (
            f"request needs more KV cache than the whole cache holds "
            f"({self.kv.num_blocks} blocks of {self.kv.block_size} tokens)"
        )
        out.failed.append(request)

    def finish(self, request: Request) -> None:
        """Drop a finished or aborted request and free its blocks."""
        for seq in request.seqs:
            if seq.block_ids:
                self.kv.free(seq)
        for seq in request.finished_beams:
            if seq.block_ids:
                self.kv.free(seq)
        request.status = RequestStatus.FINISHED
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
