"""`EngineCore`: one iteration of continuous batching, token ids in and token deltas out.

`step()` reads in three lines: the scheduler picks the step's tokens, the model runner computes their
logits, the sampler draws the next tokens; then the scheduler records what was computed and applies the
sampled tokens (`Scheduler.update`: appending, stop checks that are token ids, freeing finished blocks).
The core reports, for each request that progressed or ended, only what is new (`EngineCoreOutput`).
It never tokenizes, detokenizes or validates: the input processor did that before the request arrived,
and the output processor turns deltas into text wherever the front-end runs it.

Forking `n > 1` samples at the first sampling point, beam search (`BeamSearch`) and prompt log-probabilities
(`score_prompts`) live beside the loop.

With asynchronous scheduling (on by default on CUDA), a step whose every running sequence just sampled
launches the next decode step before its tokens reach the host (`RunAhead`): that step's input ids are
the sampled tokens, still on the device, and the host's bookkeeping for this step overlaps the GPU's work
on the next. The next call then samples the step already in flight instead of scheduling one. Rows that
must run synchronously, and why, are listed in `run_ahead.py`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch

from gptserve.config import EngineConfig
from gptserve.engine.beam_search import BeamSearch
from gptserve.engine.core_io import EngineCoreOutput, EngineCoreRequest, SeqDelta
from gptserve.engine.grammar import fill_token_bitmask
from gptserve.engine.kv_cache_manager import KVCacheManager
from gptserve.engine.model_runner import ModelRunner
from gptserve.engine.prompt_logprobs import score_prompts
from gptserve.engine.run_ahead import RunAhead
from gptserve.engine.scheduler import SampledToken, ScheduledSeq, Scheduler
from gptserve.engine.sequence import Request, Sequence
from gptserve.engine.step_inputs import LogitsLayout
from gptserve.layers.sampler import Sampler, SamplingRow, TokenBitmask, make_generator
from gptserve.sampling_params import SamplingParams


class EngineCore:
    """Generates for many requests at once over one model runner and one paged KV cache."""

    def __init__(self, config: EngineConfig, runner: ModelRunner, eos_token_ids: Iterable[int]):
        self.config = config
        self.eos_token_ids = frozenset(eos_token_ids)
        self.kv = KVCacheManager(
            config.cache.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching
        )
        self.scheduler = Scheduler(config.scheduler, self.kv, self.eos_token_ids)
        self.runner = runner
        self.sampler = Sampler()
        self.beam_search = BeamSearch(self.scheduler, self.sampler, self._sampling_row)
        self.run_ahead = RunAhead(config.scheduler, self.scheduler, runner)
        self.requests: dict[str, Request] = {}
        self._finished_outside_step: list[Request] = []
        self.num_generated_tokens = 0
        self.num_steps = 0  # steps that ran the model
        self.num_prompt_tokens = 0

    @property
    def num_steps_ahead(self) -> int:
        """Of `num_steps`, those launched before the host had their input tokens."""
        return self.run_ahead.num_launched

    # ----------------------------------------------------------------------------------------- requests
    def add_request(self, request: EngineCoreRequest) -> None:
        """Queue a request the input processor has validated."""
        params = request.params
        token_ids = request.prompt_token_ids
        seq = Sequence(
            list(token_ids), len(token_ids), generator=self._generator(params, 0), grammar=request.grammar
        )
        queued = Request(request.request_id, token_ids, params, [seq])
        self.requests[request.request_id] = queued
        self.scheduler.add(queued)
        self.num_prompt_tokens += len(token_ids)

    def abort_request(self, request_id: str) -> None:
        """Stop a request now; its blocks are freed at once and its last output reports "abort"."""
        request = self.requests.get(request_id)
        if request is None or request.finished:
            return
        for seq in request.live_seqs:
            seq.finish_reason = "abort"
        self.scheduler.finish(request)
        self._finished_outside_step.append(request)

    def finish_sequence(self, request_id: str, index: int, stop_reason: str | int | None = None) -> None:
        """End one sequence of a request (a stop string matched its text); its blocks are freed at once."""
        request = self.requests.get(request_id)
        if request is None or request.finished:
            return
        for seq in request.live_seqs:
            if seq.index == index:
                seq.finish_reason, seq.stop_reason = "stop", stop_reason
                self.kv.free(seq)
        if not request.live_seqs:
            self.scheduler.finish(request)
            self._finished_outside_step.append(request)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._finished_outside_step) or self.run_ahead.pending

    @staticmethod
    def _generator(params: SamplingParams, index: int) -> torch.Generator | None:
        if params.greedy or params.use_beam_search:
            return None
        return make_generator(None if params.seed is None else params.seed + index)

    # --------------------------------------------------------------------------------------------- step
    def step(self) -> list[EngineCoreOutput]:
        """Run one iteration; returns the news of every request that progressed or ended."""
        touched: dict[str, Request] = {}
        ahead = self.run_ahead.take()
        if ahead is not None:  # launched by the previous call: sample it now
            scheduled, logits, layout = ahead
        else:
            out = self.scheduler.schedule()
            for request in out.failed:
                for seq in request.live_seqs:
                    seq.finish_reason = "abort"
                self.scheduler.finish(request)
                touched[request.request_id] = request
            scheduled = out.scheduled
            if scheduled:
                self.num_steps += 1
                logits, layout = self.runner.execute(scheduled, out.block_copies)
        for request in self._finished_outside_step:
            touched[request.request_id] = request
        self._finished_outside_step = []
        if scheduled:
            self.scheduler.record_computed(scheduled)
            for request in score_prompts(scheduled, logits, layout):
                touched[request.request_id] = request
            self._sample(scheduled, logits, layout, touched)
        return [self._output(request) for request in touched.values()]

    def _sample(
        self,
        scheduled: list[ScheduledSeq],
        logits: torch.Tensor,
        layout: LogitsLayout,
        touched: dict[str, Request],
    ) -> None:
        by_request: dict[Request, list[tuple[Sequence, int]]] = {}
        for row, entry in zip(layout.sample_rows, layout.sample_entries):
            item = scheduled[entry]
            by_request.setdefault(item.request, []).append((item.seq, row))
        rows: list[int] = []
        sampling_rows: list[SamplingRow] = []
        targets: list[tuple[Request, Sequence]] = []
        for request, seq_rows in by_request.items():
            touched[request.request_id] = request
            if request.first_token_time is None:
                request.first_token_time = time.monotonic()
            if request.params.max_tokens == 0:  # the prompt scored, nothing to generate
                for seq, _ in seq_rows:
                    seq.finish_reason = "length"
                self.scheduler.finish(request)
                continue
            if request.params.use_beam_search:
                beams = [seq for seq, _ in seq_rows]
                self.num_generated_tokens += self.beam_search.step(
                    request, logits[[r for _, r in seq_rows]], beams
                )
                continue
            if not request.forked:
                seq_rows = self._fork_samples(request, seq_rows)
            for seq, row in seq_rows:
                if seq.finished:
                    continue
                rows.append(row)
                targets.append((request, seq))
                sampling_rows.append(self._sampling_row(request, seq))
        if not rows:
            return
        allowed = self._grammar_masks(targets, logits.shape[-1])
        before_fetch = None
        if self.run_ahead.allowed(scheduled, targets):

            def before_fetch(tokens: torch.Tensor) -> None:
                if self.run_ahead.launch(targets, tokens):
                    self.num_steps += 1

        result = self.sampler(logits[rows], sampling_rows, before_fetch=before_fetch, allowed=allowed)
        tops = result.top_logprobs  # None where a row did not ask for logprobs
        sampled = [
            SampledToken(request, seq, token, logprob, top)
            for (request, seq), token, logprob, top in zip(targets, result.token_ids, result.logprobs, tops)
        ]
        self.num_generated_tokens += len(sampled)
        self.scheduler.update(sampled)

    def _grammar_masks(self, targets: list[tuple[Request, Sequence]], vocab: int) -> TokenBitmask | None:
        """The allowed next tokens of the constrained rows, computed on the host (while the GPU runs the
        step) and applied to the logits by the sampler, outside any CUDA graph."""
        constrained = [j for j, (_, seq) in enumerate(targets) if seq.grammar is not None]
        if not constrained:
            return None
        states = [targets[j][1].grammar for j in constrained]
        return TokenBitmask(constrained, fill_token_bitmask(states, vocab))

    def _fork_samples(
        self, request: Request, seq_rows: list[tuple[Sequence, int]]
    ) -> list[tuple[Sequence, int]]:
        """At the first sampling point, split the prompt sequence into n samples sharing its blocks."""
        request.forked = True
        (parent, row), n = seq_rows[0], request.params.n
        for i in range(1, n):
            child = parent.fork(i, self._generator(request.params, i))
            self.kv.share(child)
            request.seqs.append(child)
            seq_rows.append((child, row))
        return seq_rows

    def _sampling_row(self, request: Request, seq: Sequence) -> SamplingRow:
        if seq.sampling_row is not None:  # one that reads no history and forbids nothing: reused
            return seq.sampling_row
        params = request.params
        forbidden: list[int] = []
        if seq.num_output_tokens < params.min_tokens:
            forbidden = list(params.stop_token_ids) + ([] if params.ignore_eos else list(self.eos_token_ids))
        # The token history is copied only for the processors that read it: at hundreds of sequences a
        # step, copying every prompt and output would cost milliseconds of host time per step.
        penalised = params.repetition_penalty != 1.0
        reads_output = (
            penalised or params.frequency_penalty or params.presence_penalty or params.bad_words_ids
        )
        if not forbidden and not reads_output and seq.grammar is None:
            seq.sampling_row = SamplingRow(params, seq.generator, (), ())
            return seq.sampling_row
        return SamplingRow(
            params=params,
            generator=seq.generator,
            prompt_token_ids=seq.token_ids[: seq.num_prompt_tokens] if penalised else (),
            output_token_ids=seq.output_token_ids if reads_output else (),
            forbidden_token_ids=forbidden,
        )

    # ------------------------------------------------------------------------------------------ output
    def _output(self, request: Request) -> EngineCoreOutput:
        """What is new for `request`: the tokens each sequence gained since it was last reported, and the
        sequences that ended since then. Beams report their whole output (re-ranked every step)."""
        with_logprobs = request.params.logprobs is not None
        beams = request.params.use_beam_search
        deltas = []
        for seq in request.seqs:
            if beams:
                logprobs = list(seq.logprobs) if with_logprobs else None
                deltas.append(
                    SeqDelta(
                        seq.index,
                        seq.output_token_ids,
                        logprobs,
                        seq.cumulative_logprob,
                        seq.finish_reason,
                        seq.stop_reason,
                        replaces=True,
                    )
                )
                continue
            reported = seq.num_reported_tokens
            num_output = len(seq.token_ids) - seq.num_prompt_tokens
            ended = seq.finish_reason is not None and not seq.finish_reported
            if num_output == reported and not ended:
                continue
            new = seq.token_ids[seq.num_prompt_tokens + reported :]
            logprobs = seq.logprobs[reported:] if with_logprobs else None
            deltas.append(
                SeqDelta(seq.index, new, logprobs, seq.cumulative_logprob, seq.finish_reason, seq.stop_reason)
            )
            seq.num_reported_tokens = num_output
            seq.finish_reported = seq.finish_reason is not None
        if request.finished:
            self.requests.pop(request.request_id, None)
        prompt_logprobs, request.new_prompt_logprobs = request.new_prompt_logprobs, None
        return EngineCoreOutput(
            request.request_id,
            deltas,
            request.finished,
            request.num_cached_tokens,
            request.error,
            prompt_logprobs,
        )
