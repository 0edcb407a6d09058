"""Turns the engine core's token deltas into request outputs: accumulation, incremental detokenization
and stop-string matching.

The core reports only what is new for each sequence; this keeps each sequence's output so far (token
ids, log-probs, text) and hands on a `RequestOutput` with the whole output and the step's delta. It runs
wherever the front-end wants it (on the server's event loop, or inline for offline generation), so none
of this work is done on the engine loop. A stop string found here ends its sequence at once for the
caller; the caller tells the core to stop generating it (`EngineCore.finish_sequence`), and tokens the
core produced meanwhile are dropped.

A `RequestOutput`'s `token_ids` and `logprobs` are the processor's own lists, which grow as later steps
are processed: a consumer that keeps an output past the next step copies them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from gptserve.engine.core_io import EngineCoreOutput, SeqDelta
from gptserve.engine.detokenizer import IncrementalDetokenizer
from gptserve.engine.stop_checker import StopStringMatcher
from gptserve.outputs import CompletionOutput, RequestOutput, TokenLogprob
from gptserve.sampling_params import SamplingParams


@dataclass
class _SeqState:
    """One output sequence as far as it has come."""

    index: int
    detokenizer: IncrementalDetokenizer | None
    matcher: StopStringMatcher | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    text: str = ""
    ended: bool = False  # no more news is taken (ended here by a stop string, or in the core)

    def output(self, delta_text: str = "", delta_token_ids: list[int] | None = None) -> CompletionOutput:
        return CompletionOutput(
            self.index,
            self.text,
            self.token_ids,
            self.finish_reason,
            self.stop_reason,
            self.cumulative_logprob,
            self.logprobs,
            delta_text,
            [] if delta_token_ids is None else delta_token_ids,
        )


@dataclass
class _RequestState:
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: dict[int, _SeqState] = field(default_factory=dict)
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None  # the first prompt token has none


class OutputProcessor:
    """Accumulates core outputs into `RequestOutput`s with text, applying stop strings, per request."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None, eos_token_ids: Iterable[int] = ()):
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self._requests: dict[str, _RequestState] = {}

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
    ) -> None:
        state = _RequestState(prompt, prompt_token_ids, params)
        if params.prompt_logprobs is not None:
            state.prompt_logprobs = [None]
        self._requests[request_id] = state

    def drop(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def process(self, out: EngineCoreOutput) -> tuple[RequestOutput | None, list[int]]:
        """Apply one core output. Returns the request's output to hand on (None for a request this
        processor no longer tracks) and the indices of sequences a stop string just ended, which the
        core should stop. The output is `finished` as soon as every sequence has ended here."""
        state = self._requests.get(out.request_id)
        if state is None:
            return None, []
        params = state.params
        seqs = state.seqs
        stopped: list[int] = []
        deltas: dict[int, CompletionOutput] = {}
        for d in out.seqs:
            seq = seqs.get(d.index)
            if seq is None:
                seq = seqs[d.index] = self._new_seq(state, d.index)
            if seq.ended:
                continue  # a stop string ended it here: what the core produced meanwhile is dropped
            before = 0 if d.replaces else len(seq.token_ids)
            new = self._accumulate(seq, d)
            if d.replaces and not d.finished:
                continue  # beams change every step; their text is decoded once they end
            if seq.detokenizer is None and seq.matcher is None:  # no tokenizer: token ids only
                text = ""
                seq.ended = d.finished
            else:
                text, hit = self._detokenize(params, seq, new, d.finished)
                if hit:
                    stopped.append(d.index)
            deltas[d.index] = seq.output(text, seq.token_ids[before:])
        if params.use_beam_search:  # the beams are exactly the ones reported (pruned every step)
            reported = {d.index for d in out.seqs}
            state.seqs = seqs = {i: s for i, s in seqs.items() if i in reported}
        state.num_cached_tokens = out.num_cached_tokens
        if out.prompt_logprobs and state.prompt_logprobs is not None:
            state.prompt_logprobs.extend(out.prompt_logprobs)
        if len(seqs) == 1:  # the common case, every step of every sequence
            (only,) = seqs.values()
            done = only.ended and (params.n == 1 or params.use_beam_search)
            outputs = [deltas.get(only.index) or only.output()]
        else:
            ordered = sorted(seqs.values(), key=_by_index)
            expected = len(ordered) if params.use_beam_search else params.n
            done = len(ordered) >= expected and all(s.ended for s in ordered)
            outputs = [deltas.get(s.index) or s.output() for s in ordered]
        finished = out.finished or done
        if finished:
            del self._requests[out.request_id]
        result = RequestOutput(
            out.request_id,
            state.prompt,
            state.prompt_token_ids,
            outputs,
            finished,
            state.num_cached_tokens,
            out.error,
            state.prompt_logprobs,
        )
        return result, stopped

    def _new_seq(self, state: _RequestState, index: int) -> _SeqState:
        params = state.params
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, state.prompt_token_ids, params.skip_special_tokens)
        matcher = StopStringMatcher(params.stop, params.include_stop_str_in_output) if params.stop else None
        logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        return _SeqState(index, detok, matcher, logprobs=logprobs)

    @staticmethod
    def _accumulate(seq: _SeqState, d: SeqDelta) -> list[int]:
        """Take `d`'s tokens and state into `seq`; returns the tokens whose text is still to come."""
        if d.replaces:
            seq.token_ids = list(d.new_token_ids)
            seq.logprobs = d.new_logprobs
        else:
            seq.token_ids.extend(d.new_token_ids)
            if d.new_logprobs is not None and seq.logprobs is not None:
                seq.logprobs.extend(d.new_logprobs)
        seq.cumulative_logprob = d.cumulative_logprob
        seq.finish_reason, seq.stop_reason = d.finish_reason, d.stop_reason
        return seq.token_ids if d.replaces else d.new_token_ids

    def _detokenize(
        self, params: SamplingParams, seq: _SeqState, new: list[int], finished: bool
    ) -> tuple[str, bool]:
        """The text `new` adds to `seq` (held-back text released at its end); True if a stop string
        ended the sequence, which then keeps only the tokens up to the one that completed it."""
        num_before = len(seq.token_ids) - len(new)
        # A token that ended the sequence by id (EOS, stop_token_ids) adds no text.
        if (
            new
            and seq.finish_reason == "stop"
            and ((not params.ignore_eos and new[-1] in self.eos_token_ids) or seq.stop_reason == new[-1])
        ):
            new = new[:-1]
        delta = ""
        for i, token in enumerate(new):
            piece = seq.detokenizer.add_tokens([token]) if seq.detokenizer is not None else ""
            # Stop strings count only once min_tokens are out; text before that passes straight through.
            if seq.matcher is not None and num_before + i + 1 >= params.min_tokens:
                piece, hit = seq.matcher.feed(piece)
                if hit:
                    kept = num_before + i + 1
                    seq.token_ids = seq.token_ids[:kept]
                    if seq.logprobs is not None:
                        seq.logprobs = seq.logprobs[:kept]
                    seq.finish_reason, seq.stop_reason = "stop", seq.matcher.matched
                    seq.ended = True
                    seq.text += delta + piece
                    return delta + piece, True
            delta += piece
        if finished:
            delta += self._flush(seq)
            seq.ended = True
        seq.text += delta
        return delta, False

    @staticmethod
    def _flush(seq: _SeqState) -> str:
        """Text held back (partial characters, possible stop-string prefixes) released at the end."""
        if seq.detokenizer is None:
            return ""
        tail = seq.detokenizer.flush()
        if seq.matcher is None:
            return tail
        text, _ = seq.matcher.feed(tail)
        return text + seq.matcher.flush()


def _by_index(seq: _SeqState) -> int:
    return seq.index
