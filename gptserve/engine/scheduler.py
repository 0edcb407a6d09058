"""Continuous batching: which sequences run in the next step, how many tokens each, and what a step did.

Every step has a token budget (`max_num_batched_tokens`). Running requests come first (one token per
decoding sequence, or the next chunk of a prompt), then waiting requests are admitted in arrival
order, their prompts chunked to fit the budget. When KV blocks run out, the most recently admitted
running request is preempted: its blocks are freed and it recomputes later (its own blocks often
come back from the prefix cache). All sequences of a request step together, so n-way samples and
beams always reach their sampling point in the same step.

After the model ran, `record_computed` counts the computed tokens and caches the blocks they filled, and
`update` appends the sampled tokens, advances structured-output grammars and applies the stop conditions
that are token ids (EOS, stop tokens, stop token sequences, a completed grammar, lengths), freeing the
blocks of every sequence that ended.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from gptserve.config import SchedulerConfig
from gptserve.engine.kv_cache_manager import KVCacheManager
from gptserve.engine.sequence import Request, RequestStatus, Sequence
from gptserve.outputs import TokenLogprob


@dataclass
class ScheduledSeq:
    """`num_new_tokens` tokens of `seq` to compute; `sample` when they end at its last token."""

    seq: Sequence
    request: Request
    num_new_tokens: int
    sample: bool


@dataclass(slots=True)
class SampledToken:
    """A token sampled for `seq`; `logprob` is its raw log-probability, `top` the alternatives asked for."""

    request: Request
    seq: Sequence
    token_id: int
    logprob: float
    top: list[tuple[int, float]] | None


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

    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, eos_token_ids: Iterable[int] = ()):
        self.config = config
        self.kv = kv
        self.eos_token_ids = frozenset(eos_token_ids)
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
        if len(plan) == 1:  # the common case, asked for every running sequence every step
            return self.kv.blocks_needed(plan[0].seq, plan[0].num_new_tokens)
        return self.kv.blocks_needed_for((p.seq, p.num_new_tokens) for p in plan)

    @staticmethod
    def _num_seq_slots(request: Request) -> int:
        """Sequences `request` runs once it reaches its first sampling point: its n samples (or beams),
        which its one prompt sequence forks into then, so `max_num_seqs` holds from admission on."""
        if request.forked:
            return len(request.live_seqs)
        params = request.params
        return params.beam_width if params.use_beam_search else params.n

    def _allocate(self, plan: list[ScheduledSeq], out: SchedulerOutput) -> None:
        for p in plan:
            self.kv.allocate(p.seq, p.num_new_tokens, out.block_copies)
        out.scheduled.extend(plan)

    def preempt(self, request: Request) -> None:
        """Free every block of `request` and put it back at the head of the queue."""
        if request in self.running:
            self.running.remove(request)
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
        num_seqs = sum(self._num_seq_slots(r) for r in self.running)
        while self.waiting and budget > 0:
            request = self.waiting[0]
            live = request.live_seqs
            slots = self._num_seq_slots(request)
            if num_seqs + slots > self.config.max_num_seqs and self.running:
                break
            lookup: tuple[int, int] | None = None  # (tokens looked up, tokens found) of its first sequence
            # A request that asked for prompt log-probs computes its whole prompt: a cached prefix has no
            # logits to give them.
            reuse = request.params.prompt_logprobs is None
            for seq in live:
                if reuse and seq.num_computed_tokens == 0 and not seq.block_ids:
                    hit = self.kv.match_prefix(seq)
                    lookup = lookup or (seq.num_tokens, hit)
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
            if lookup is not None:
                self.kv.count_prefix_lookup(*lookup)
            self._allocate(plan, out)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            num_seqs += slots
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

    # ------------------------------------------------------------------------------ after the model ran
    def record_computed(self, scheduled: list[ScheduledSeq]) -> None:
        """The step's tokens are in the cache: count them and offer the blocks they filled to the prefix
        cache. A sequence that ended while its step ran ahead is skipped (its blocks are gone)."""
        for item in scheduled:
            if item.seq.finished:
                continue
            item.seq.num_computed_tokens += item.num_new_tokens
            self.kv.cache_full_blocks(item.seq)

    def update(self, sampled: list[SampledToken]) -> None:
        """Append each sampled token to its sequence, end the sequences a stop condition or length limit
        ends (their blocks are freed at once), and finish the requests left with no live sequence."""
        for s in sampled:
            self._append(s)
        for s in sampled:
            request = s.request
            if not request.finished and not request.live_seqs:
                self.finish(request)

    def _append(self, s: SampledToken) -> None:
        seq, params, token = s.seq, s.request.params, s.token_id
        seq.token_ids.append(token)
        seq.cumulative_logprob += s.logprob
        if s.top is not None:
            seq.logprobs.append(TokenLogprob(token, s.logprob, s.top))
        n_out = seq.num_output_tokens
        if n_out >= params.min_tokens:
            if not params.ignore_eos and token in self.eos_token_ids:
                seq.finish_reason = "stop"
            elif token in params.stop_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", token
            elif params.stop_token_sequences and any(
                ends_with(seq.output_token_ids, stop) for stop in params.stop_token_sequences
            ):
                seq.finish_reason = "stop"
        if seq.grammar is not None and seq.finish_reason is None:
            # The mask allowed only what the grammar accepts; a rejected token (possible only when
            # every token was masked, e.g. EOS forbidden by min_tokens) ends the sequence.
            if not seq.grammar.accept(token):
                seq.finish_reason = "abort"
            elif seq.grammar.complete:  # nothing may follow: end now rather than sample the EOS
                seq.finish_reason = "stop"
        if seq.finish_reason is None and self.ends_by_length(s.request, n_out, seq.num_tokens):
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            self.kv.free(seq)

    def ends_by_length(self, request: Request, num_output_tokens: int, num_tokens: int) -> bool:
        """Whether a sequence with these many output and total tokens has reached its length limit."""
        max_tokens = request.params.max_tokens
        return (
            max_tokens is not None and num_output_tokens >= max_tokens
        ) or num_tokens >= self.config.max_model_len

    def ends_with_next_token(self, request: Request, seq: Sequence) -> bool:
        """Whether the token being sampled for `seq` now brings it to its length limit."""
        return self.ends_by_length(request, seq.num_output_tokens + 1, seq.num_tokens + 1)


def ends_with(tokens: list[int], suffix: list[int]) -> bool:
    return len(tokens) >= len(suffix) and tokens[len(tokens) - len(suffix) :] == suffix
