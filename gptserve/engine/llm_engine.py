"""The engine core: admit requests, step the scheduler and the model, sample, and report results.

`step_tokens()` is one iteration of continuous batching: schedule -> run the model on the packed batch ->
sample every sequence that reached its last token -> append tokens, check the stop conditions that are
token ids (EOS, stop tokens, token sequences, lengths), free the blocks of finished sequences. It never
waits on anything but the model, and produces token ids only. Text (detokenization, stop strings) is the
`OutputProcessor`'s job: the server runs it on its event loop; `step()` runs it inline for offline use.

With asynchronous scheduling (on by default on CUDA), a step whose every running sequence
just sampled launches the next decode step before its tokens reach the host: that step's input ids are
the sampled tokens, still on the device, and the host's bookkeeping for this step (appending tokens, stop
checks, outputs) overlaps the GPU's work on the next. The next call then samples the step already in
flight instead of scheduling one. A sequence that ends at this step (EOS, a stop token or string, an
abort) wastes its row of the step ahead, whose token is dropped; one that ends by length is left out
beforehand. Only steps whose sampling reads no token history run ahead (no penalties, bad words or
pending min_tokens), and only while no waiting request could be admitted at the next step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence as Seq

import torch
from transformers import PreTrainedTokenizerBase

from gptserve.config import EngineConfig
from gptserve.engine.beam_search import BeamState, beam_step
from gptserve.engine.kv_cache_manager import KVCacheManager
from gptserve.engine.model_runner import ModelRunner
from gptserve.engine.output_processor import OutputProcessor
from gptserve.engine.scheduler import ScheduledSeq, Scheduler
from gptserve.engine.sequence import Request, Sequence
from gptserve.errors import InvalidRequestError
from gptserve.layers.sampler import Sampler, SamplingRow, make_generator
from gptserve.outputs import CompletionOutput, RequestOutput, TokenLogprob
from gptserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class LLMEngine:
    """Generates for many requests at once over one model and one paged KV cache."""

    def __init__(
        self,
        config: EngineConfig,
        runner: ModelRunner,
        tokenizer: PreTrainedTokenizerBase | None,
        model_name: str = "model",
        chat_template: str | None = None,
    ):
        self.config = config
        self.model_config = config.model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.chat_template = chat_template
        self.max_model_len = config.scheduler.max_model_len
        num_blocks = config.cache.num_blocks
        self.kv = KVCacheManager(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv)
        self.runner = runner
        self.sampler = Sampler()
        self.requests: dict[str, Request] = {}
        self._finished_outside_step: list[Request] = []
        # A decode step launched before the host had its input tokens: (scheduled, logits, logits entries)
        self._ahead: tuple[list[ScheduledSeq], torch.Tensor, list[int]] | None = None
        self.eos_token_ids = set(config.model.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(tokenizer.eos_token_id)
        self.output_processor = OutputProcessor(tokenizer, self.eos_token_ids)
        self.num_generated_tokens = 0
        self.num_steps = 0  # steps that ran the model
        self.num_steps_ahead = 0  # of which launched before the host had their input tokens
        self.num_prompt_tokens = 0

    # ----------------------------------------------------------------------------------------- requests
    def tokenize(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer: send token ids instead of text", "prompt")
        return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

    def add_request(
        self, request_id: str, prompt: str | Seq[int], params: SamplingParams, detokenize: bool = True
    ) -> Request:
        """Validate and queue a request. Raises `InvalidRequestError` naming the problem.

        With `detokenize`, `step()` reports the request's text; without, only `step_tokens()` reports it
        and the caller runs its own `OutputProcessor`."""
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        text = prompt if isinstance(prompt, str) else None
        token_ids = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        vocab = self.model_config.vocab_size
        if not token_ids:
            raise InvalidRequestError("prompt is empty", "prompt")
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(
                f"prompt holds token id {bad[0]} outside the vocabulary of {vocab}", "prompt"
            )
        if len(token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(token_ids)} tokens but the model's context is {self.max_model_len} tokens "
                f"(max_model_len), which must also leave room for at least one generated token",
                "prompt",
            )
        params.check_vocab(vocab)
        seq = Sequence(list(token_ids), len(token_ids), generator=self._generator(params, 0))
        request = Request(request_id, text, list(token_ids), params, [seq])
        self.requests[request_id] = request
        self.scheduler.add(request)
        self.num_prompt_tokens += len(token_ids)
        if detokenize:
            self.output_processor.add_request(request_id, token_ids, params)
        return request

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
        return self.scheduler.has_unfinished() or bool(self._finished_outside_step) or self._ahead is not None

    @staticmethod
    def _generator(params: SamplingParams, index: int) -> torch.Generator | None:
        if params.greedy or params.use_beam_search:
            return None
        return make_generator(None if params.seed is None else params.seed + index)

    # --------------------------------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """Run one engine iteration; returns, with their text, the requests added with `detokenize`
        that progressed or finished. A stop string ends its sequence here, before the next step."""
        results = []
        for out in self.step_tokens():
            processed, stopped = self.output_processor.process(out)
            if processed is None:
                continue
            for c in processed.outputs:
                if c.index in stopped:
                    self.finish_sequence(out.request_id, c.index, c.stop_reason)
            results.append(processed)
        return results

    def step_tokens(self) -> list[RequestOutput]:
        """Run one engine iteration; returns the requests that progressed or finished, as token ids
        (`text` and `delta_text` empty)."""
        touched: dict[str, Request] = {}
        ahead, self._ahead = self._ahead, None
        if ahead is not None:  # launched by the previous call: sample it now
            scheduled, logits, entries = ahead
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
                logits, entries = self.runner.execute(scheduled, out.block_copies)
        for request in self._finished_outside_step:
            touched[request.request_id] = request
        self._finished_outside_step = []
        deltas: dict[int, list[int]] = {}
        if scheduled:
            for item in scheduled:
                if item.seq.finished:  # ended while its step ran ahead: its token is dropped
                    continue
                item.seq.num_computed_tokens += item.num_new_tokens
                self.kv.cache_full_blocks(item.seq)
            self._sample(scheduled, logits, entries, deltas, touched)
        return [self._output(r, deltas) for r in touched.values()]

    def _sample(
        self,
        scheduled: list[ScheduledSeq],
        logits: torch.Tensor,
        entries: list[int],
        deltas: dict[int, list[int]],
        touched: dict[str, Request],
    ) -> None:
        by_request: dict[Request, list[tuple[Sequence, int]]] = {}
        for row, entry in enumerate(entries):
            item = scheduled[entry]
            by_request.setdefault(item.request, []).append((item.seq, row))
        rows: list[int] = []
        sampling_rows: list[SamplingRow] = []
        targets: list[tuple[Request, Sequence]] = []
        for request, seq_rows in by_request.items():
            touched[request.request_id] = request
            if request.first_token_time is None:
                request.first_token_time = time.monotonic()
            if request.params.use_beam_search:
                self._beam_step(request, logits[[r for _, r in seq_rows]], seq_rows)
                continue
            if not request.forked:
                seq_rows = self._fork_samples(request, seq_rows)
            for seq, row in seq_rows:
                if seq.finished:
                    continue
                rows.append(row)
                targets.append((request, seq))
                sampling_rows.append(self._sampling_row(request.params, seq))
        if not rows:
            return
        before_fetch = None
        if self._can_run_ahead(scheduled, targets):

            def before_fetch(tokens: torch.Tensor) -> None:
                self._run_ahead(targets, tokens)

        result = self.sampler(logits[rows], sampling_rows, before_fetch=before_fetch)
        for i, (request, seq) in enumerate(targets):
            token = result.token_ids[i]
            logprob = result.logprobs[i]
            seq.cumulative_logprob += logprob
            if request.params.logprobs is not None:
                seq.logprobs.append(TokenLogprob(token, logprob, result.top_logprobs[i] or []))
            self._append(request, seq, token, deltas)
        for request, _ in targets:
            self._maybe_finish_request(request)

    def _can_run_ahead(self, scheduled: list[ScheduledSeq], targets: list[tuple[Request, Sequence]]) -> bool:
        """Whether the next step may be launched from this step's tokens on the device: every running
        sequence samples now, none reads token history, and no waiting request could be admitted."""
        if not self.config.scheduler.async_scheduling:
            return False
        if len(targets) != len(scheduled) or len(targets) > self.config.scheduler.max_num_batched_tokens:
            return False
        if any(not item.sample for item in scheduled):
            return False
        if sum(len(r.live_seqs) for r in self.scheduler.running) != len(targets):
            return False
        if self.scheduler.waiting and not self._admits_none_next(targets):
            return False
        return all(seq.sampling_row is not None for _, seq in targets)

    def _admits_none_next(self, targets: list[tuple[Request, Sequence]]) -> bool:
        """With requests waiting, whether the next step would admit none of them anyway: the running set
        is at `max_num_seqs` and no sequence reaches its length limit at this step. (A sequence that ends
        on a stop token frees its place one step later than it would without the step run ahead.)"""
        if len(targets) < self.config.scheduler.max_num_seqs:
            return False
        return not any(self._ends_with_this_step(request, seq) for request, seq in targets)

    def _run_ahead(self, targets: list[tuple[Request, Sequence]], tokens: torch.Tensor) -> None:
        """Launch the decode step that follows this one for every sequence that will not end by length,
        its input ids taken from `tokens` (this step's samples, on the device)."""
        keep: list[int] = []
        items: list[ScheduledSeq] = []
        for i, (request, seq) in enumerate(targets):
            if self._ends_with_this_step(request, seq):
                continue
            keep.append(i)
            items.append(ScheduledSeq(seq, request, 1, True))
        if not items:
            return
        if not self.kv.can_allocate(sum(self.kv.blocks_needed(item.seq, 1) for item in items)):
            return
        copies: list[tuple[int, int]] = []
        for item in items:
            self.kv.allocate(item.seq, 1, copies)
        if len(keep) < len(targets):
            tokens = tokens[torch.tensor(keep, device=tokens.device)]
        self.num_steps += 1
        self.num_steps_ahead += 1
        logits, entries = self.runner.execute(items, copies, tokens)
        self._ahead = (items, logits, entries)

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

    def _sampling_row(self, params: SamplingParams, seq: Sequence) -> SamplingRow:
        if seq.sampling_row is not None:  # one that reads no history and forbids nothing: reused
            return seq.sampling_row
        forbidden: list[int] = []
        if seq.num_output_tokens < params.min_tokens:
            forbidden = list(params.stop_token_ids) + ([] if params.ignore_eos else list(self.eos_token_ids))
        # The token history is copied only for the processors that read it: at hundreds of sequences a
        # step, copying every prompt and output would cost milliseconds of host time per step.
        penalised = params.repetition_penalty != 1.0
        reads_output = (
            penalised or params.frequency_penalty or params.presence_penalty or params.bad_words_ids
        )
        if not forbidden and not reads_output:
            seq.sampling_row = SamplingRow(params, seq.generator, (), ())
            return seq.sampling_row
        return SamplingRow(
            params=params,
            generator=seq.generator,
            prompt_token_ids=seq.token_ids[: seq.num_prompt_tokens] if penalised else (),
            output_token_ids=seq.output_token_ids if reads_output else (),
            forbidden_token_ids=forbidden,
        )

    # ---------------------------------------------------------------------------------- stop conditions
    def _append(self, request: Request, seq: Sequence, token: int, deltas: dict[int, list[int]]) -> None:
        params = request.params
        seq.token_ids.append(token)
        self.num_generated_tokens += 1
        deltas.setdefault(seq.seq_id, []).append(token)
        n_out = seq.num_output_tokens
        if n_out >= params.min_tokens:
            if not params.ignore_eos and token in self.eos_token_ids:
                seq.finish_reason = "stop"
            elif token in params.stop_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", token
            elif params.stop_token_sequences and any(
                _ends_with(seq.output_token_ids, s) for s in params.stop_token_sequences
            ):
                seq.finish_reason = "stop"
        if seq.finish_reason is None and self._ends_by_length(params, n_out, seq.num_tokens):
            seq.finish_reason = "length"
        if seq.finished:
            self.kv.free(seq)

    def _ends_by_length(self, params: SamplingParams, num_output_tokens: int, num_tokens: int) -> bool:
        """Whether a sequence with these many output and total tokens has reached its length limit."""
        return (
            params.max_tokens is not None and num_output_tokens >= params.max_tokens
        ) or num_tokens >= self.max_model_len

    def _ends_with_this_step(self, request: Request, seq: Sequence) -> bool:
        """Whether the token being sampled for `seq` now brings it to its length limit."""
        return self._ends_by_length(request.params, seq.num_output_tokens + 1, seq.num_tokens + 1)

    def _maybe_finish_request(self, request: Request) -> None:
        if not request.finished and not request.live_seqs:
            self.scheduler.finish(request)

    # ------------------------------------------------------------------------------------- beam search
    def _beam_step(
        self,
        request: Request,
        logits: torch.Tensor,
        seq_rows: list[tuple[Sequence, int]],
    ) -> None:
        params = request.params
        if request.beam_state is None:
            request.beam_state = BeamState(params.beam_width, params.length_penalty)
        state: BeamState = request.beam_state
        beams = [seq for seq, _ in seq_rows]
        num_generated = beams[0].num_output_tokens
        at_limit = (params.max_tokens is not None and num_generated + 1 >= params.max_tokens) or (
            beams[0].num_tokens + 1 >= self.max_model_len
        )
        end_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        end_pairs: set[tuple[int, int]] = set()
        if num_generated + 1 >= params.min_tokens:
            for i, seq in enumerate(beams):
                output = seq.output_token_ids
                for stop in params.stop_token_sequences:
                    if _ends_with(output, stop[:-1]):
                        end_pairs.add((i, stop[-1]))
        # The sampler's logits processors, per beam on its own history, applied to the log-softmax.
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        scores = self.sampler.process_logits(logprobs, [self._sampling_row(params, seq) for seq in beams])
        step = beam_step(
            state,
            logprobs,
            scores,
            [b.beam_score for b in beams],
            num_generated,
            end_ids,
            at_limit,
            end_pairs,
        )
        top = self._beam_top_logprobs(params, logprobs)

        for cand, normalised in step.finishing:
            parent = beams[cand.parent]
            done = Sequence(parent.token_ids + [cand.token_id], parent.num_prompt_tokens)
            token_logprob = TokenLogprob(cand.token_id, cand.token_logprob, top[cand.parent])
            done.logprobs = parent.logprobs + [token_logprob]
            done.cumulative_logprob = parent.cumulative_logprob + cand.token_logprob
            if cand.token_id in end_ids or (cand.parent, cand.token_id) in end_pairs:
                done.finish_reason = "stop"
                eos = not params.ignore_eos and cand.token_id in self.eos_token_ids
                if not eos and cand.token_id in params.stop_token_ids:
                    done.stop_reason = cand.token_id
            else:
                done.finish_reason = "length"
            done.beam_score = normalised
            request.finished_beams.append(done)
        request.finished_beams.sort(key=lambda s: s.beam_score, reverse=True)
        del request.finished_beams[state.width :]

        if state.done:
            for seq in beams:
                self.kv.free(seq)
                seq.finish_reason = "stop"
            request.seqs = []
            self._finish_beams(request)
            return
        # The first continuation of a beam keeps its sequence; further ones fork it (sharing blocks).
        used: set[int] = set()
        new_beams: list[Sequence] = []
        for cand in step.continuing:
            parent = beams[cand.parent]
            if cand.parent in used:
                seq = parent.fork(len(new_beams), None)
                self.kv.share(seq)
            else:
                used.add(cand.parent)
                seq = parent
            new_beams.append(seq)
        for seq, cand in zip(new_beams, step.continuing):
            seq.token_ids.append(cand.token_id)
            seq.beam_score = cand.score
            seq.cumulative_logprob += cand.token_logprob
            seq.logprobs.append(TokenLogprob(cand.token_id, cand.token_logprob, top[cand.parent]))
        for i, seq in enumerate(beams):
            if i not in used:
                self.kv.free(seq)
        request.seqs = new_beams
        self.num_generated_tokens += len(new_beams)

    @staticmethod
    def _beam_top_logprobs(params: SamplingParams, logprobs: torch.Tensor) -> list[list[tuple[int, float]]]:
        """Per live beam, its `params.logprobs` most likely (id, raw log-prob) pairs (empty if not asked)."""
        k = min(params.logprobs or 0, logprobs.shape[-1])
        if k == 0:
            return [[] for _ in range(logprobs.shape[0])]
        values, ids = (t.tolist() for t in logprobs.topk(k, dim=-1))
        return [list(zip(i, v, strict=True)) for i, v in zip(ids, values, strict=True)]

    def _finish_beams(self, request: Request) -> None:
        best = request.finished_beams[: request.params.n]
        for i, seq in enumerate(best):
            seq.index = i
        request.seqs = best
        request.finished_beams = []
        self.scheduler.finish(request)

    # ------------------------------------------------------------------------------------------ output
    def _output(self, request: Request, deltas: dict[int, list[int]]) -> RequestOutput:
        seqs = request.seqs if len(request.seqs) == 1 else sorted(request.seqs, key=lambda s: s.index)
        with_logprobs = request.params.logprobs is not None
        outputs = [
            CompletionOutput(
                index=seq.index,
                text="",
                token_ids=seq.output_token_ids,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
                cumulative_logprob=seq.cumulative_logprob,
                logprobs=list(seq.logprobs) if with_logprobs else None,
                delta_token_ids=deltas.get(seq.seq_id, []),
            )
            for seq in seqs
        ]
        if request.finished:
            self.requests.pop(request.request_id, None)
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=outputs,
            finished=request.finished,
            num_cached_tokens=request.num_cached_tokens,
            error=request.error,
        )


def _ends_with(tokens: list[int], suffix: list[int]) -> bool:
    return len(tokens) >= len(suffix) and tokens[len(tokens) - len(suffix) :] == suffix
