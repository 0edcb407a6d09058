"""Turns the engine's token outputs into text: incremental detokenization and stop-string matching.

The engine core only produces token ids. This runs wherever the front-end wants it (on the event loop
of the server, or inline for offline generation), so detokenizing never stalls the engine loop. A stop
string found here ends its sequence at once for the caller; the caller tells the engine to stop
generating it (`LLMEngine.finish_sequence`), and tokens the engine produced meanwhile are dropped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from gptserve.engine.detokenizer import IncrementalDetokenizer
from gptserve.engine.stop_checker import StopStringMatcher
from gptserve.outputs import CompletionOutput, RequestOutput
from gptserve.sampling_params import SamplingParams


@dataclass
class _SeqText:
    """Text state of one output sequence."""

    detokenizer: IncrementalDetokenizer | None
    matcher: StopStringMatcher | None
    text: str = ""
    final: CompletionOutput | None = None  # set once the sequence ended (here or in the engine)


@dataclass
class _RequestText:
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: dict[int, _SeqText] = field(default_factory=dict)

    @property
    def num_outputs(self) -> int:
        return self.params.n


class OutputProcessor:
    """Adds `text`/`delta_text` to engine outputs and applies stop strings, request by request."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None, eos_token_ids: Iterable[int] = ()):
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self._requests: dict[str, _RequestText] = {}

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self._requests[request_id] = _RequestText(list(prompt_token_ids), params)

    def drop(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def process(self, out: RequestOutput) -> tuple[RequestOutput | None, list[int]]:
        """Fill in the text of one engine output. Returns the output to hand on (None for a request this
        processor no longer tracks) and the indices of sequences a stop string just ended, which the
        engine should stop. The output reports `finished` as soon as every sequence has ended here."""
        state = self._requests.get(out.request_id)
        if state is None:
            return None, []
        stopped: list[int] = []
        beam = state.params.use_beam_search
        outputs = []
        for c in out.outputs:
            seq = state.seqs.get(c.index)
            if seq is None:
                seq = state.seqs[c.index] = self._new_seq(state, c)
            if seq.final is not None:
                outputs.append(_frozen(seq.final))
                continue
            if beam and not c.finished:
                outputs.append(c)  # beams change every step; their text is decoded once they end
                continue
            if self._apply(state.params, seq, c):
                stopped.append(c.index)
            outputs.append(c)
        out.outputs = outputs
        expected = len(out.outputs) if beam else state.num_outputs
        done = len(state.seqs) >= expected and all(s.final is not None for s in state.seqs.values())
        if out.finished or done:
            out.finished = True
            self.drop(out.request_id)
        return out, stopped

    def _new_seq(self, state: _RequestText, c: CompletionOutput) -> _SeqText:
        params = state.params
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, state.prompt_token_ids, params.skip_special_tokens)
        matcher = StopStringMatcher(params.stop, params.include_stop_str_in_output) if params.stop else None
        seq = _SeqText(detok, matcher)
        earlier = c.token_ids[: len(c.token_ids) - len(c.delta_token_ids)]
        if detok is not None and earlier:  # a sequence forked from one that already had output
            seq.text = detok.add_tokens(earlier)
        return seq

    def _apply(self, params: SamplingParams, seq: _SeqText, c: CompletionOutput) -> bool:
        """Detokenize `c`'s new tokens into `c.text`/`c.delta_text`; True if a stop string ended it."""
        new = c.token_ids if params.use_beam_search else c.delta_token_ids
        num_before = len(c.token_ids) - len(new)
        # A token that ended the sequence by id (EOS, stop_token_ids) adds no text.
        if (
            new
            and c.finish_reason == "stop"
            and ((not params.ignore_eos and new[-1] in self.eos_token_ids) or c.stop_reason == new[-1])
        ):
            new = new[:-1]
        delta = ""
        for i, token in enumerate(new):
            piece = seq.detokenizer.add_tokens([token]) if seq.detokenizer is not None else ""
            # Stop strings count only once min_tokens are out; text before that passes straight through.
            if seq.matcher is not None and num_before + i + 1 >= params.min_tokens:
                piece, hit = seq.matcher.feed(piece)
                if hit:
                    delta += piece
                    kept = num_before + i + 1
                    c.token_ids = c.token_ids[:kept]
                    c.delta_token_ids = c.delta_token_ids[: max(kept - num_before, 0)]
                    if c.logprobs is not None:
                        c.logprobs = c.logprobs[:kept]
                    c.finish_reason, c.stop_reason = "stop", seq.matcher.matched
                    self._end(seq, c, delta)
                    return True
            delta += piece
        if c.finished:
            delta += self._flush(seq)
            self._end(seq, c, delta)
        else:
            seq.text += delta
            c.text, c.delta_text = seq.text, delta
        return False

    @staticmethod
    def _flush(seq: _SeqText) -> str:
        """Text held back (partial characters, possible stop-string prefixes) released at the end."""
        if seq.detokenizer is None:
            return ""
        tail = seq.detokenizer.flush()
        if seq.matcher is None:
            return tail
        text, _ = seq.matcher.feed(tail)
        return text + seq.matcher.flush()

    @staticmethod
    def _end(seq: _SeqText, c: CompletionOutput, delta: str) -> None:
        seq.text += delta
        c.text, c.delta_text = seq.text, delta
        seq.final = c


def _frozen(final: CompletionOutput) -> CompletionOutput:
    """A sequence that already ended reports its final state again, with nothing new."""
    return CompletionOutput(
        index=final.index,
        text=final.text,
        token_ids=final.token_ids,
        finish_reason=final.finish_reason,
        stop_reason=final.stop_reason,
        cumulative_logprob=final.cumulative_logprob,
        logprobs=final.logprobs,
    )
