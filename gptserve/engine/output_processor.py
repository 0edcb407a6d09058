"""Turns sampled token ids into text: incremental detokenization and stop-string matching.

Kept apart from the scheduler and model so it can run wherever the front-end wants it; the engine
only learns which sequences a stop string finished.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from gptserve.engine.detokenizer import IncrementalDetokenizer
from gptserve.engine.sequence import Sequence
from gptserve.engine.stop_checker import StopStringMatcher
from gptserve.sampling_params import SamplingParams


@dataclass
class _TextState:
    detokenizer: IncrementalDetokenizer
    matcher: StopStringMatcher | None
    stopped: bool = False


class OutputProcessor:
    """Keeps `seq.text` up to date and reports stop-string hits."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None):
        self.tokenizer = tokenizer

    def _state(self, seq: Sequence, params: SamplingParams) -> _TextState | None:
        if self.tokenizer is None:
            return None
        if seq.output_state is None:
            prompt = seq.token_ids[: seq.num_prompt_tokens]
            detok = IncrementalDetokenizer(self.tokenizer, prompt, params.skip_special_tokens)
            if seq.num_output_tokens:  # a fork continues from its parent's text
                detok.add_tokens(seq.output_token_ids)
            matcher = (
                StopStringMatcher(params.stop, params.include_stop_str_in_output) if params.stop else None
            )
            seq.output_state = _TextState(detok, matcher)
        return seq.output_state

    def add_tokens(self, seq: Sequence, params: SamplingParams, token_ids: list[int]) -> str:
        """Detokenize new tokens; returns the text delta. Sets the finish reason on a stop-string hit."""
        state = self._state(seq, params)
        if state is None or state.stopped:
            return ""
        delta = state.detokenizer.add_tokens(token_ids)
        # Stop strings count only once min_tokens are out; text before that passes straight through.
        if state.matcher is not None and seq.num_output_tokens >= params.min_tokens:
            delta, stopped = state.matcher.feed(delta)
            if stopped:
                state.stopped = True
                seq.finish_reason = "stop"
                seq.stop_reason = state.matcher.matched
        seq.text += delta
        return delta

    def finish(self, seq: Sequence, params: SamplingParams) -> str:
        """Release text held back (partial characters, possible stop-string prefixes) at the end."""
        state = self._state(seq, params)
        if state is None or state.stopped:
            return ""
        delta = state.detokenizer.flush()
        if state.matcher is not None:
            text, stopped = state.matcher.feed(delta)
            delta = text if stopped else text + state.matcher.flush()
            if stopped:
                seq.stop_reason = state.matcher.matched
        state.stopped = True
        seq.text += delta
        return delta
