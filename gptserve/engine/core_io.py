"""What crosses the engine core's boundary: requests in (already validated), token deltas out.

The core trusts an `EngineCoreRequest`: the input processor has tokenized it and checked its vocabulary,
context length and sampling values. Each step, the core reports only what is new for each sequence that
progressed or ended (one token and its log-probability for a sampled sequence), never a sequence's whole
history: whoever needs the whole output (the output processor) accumulates it.
"""

from __future__ import annotations

from dataclasses import dataclass

from gptserve.engine.grammar import GrammarState
from gptserve.outputs import TokenLogprob
from gptserve.sampling_params import SamplingParams


@dataclass
class EngineCoreRequest:
    """A request the core may admit as it is."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    grammar: GrammarState | None = None  # structured output: the compiled constraint, at its start


@dataclass(slots=True)
class SeqDelta:
    """What one sequence of a request gained in one step, and how it ended if it did."""

    index: int
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob] | None  # None unless the request asked for logprobs
    cumulative_logprob: float
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    # Beam search re-ranks its beams every step, so a beam reports its whole output instead of a delta.
    replaces: bool = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class EngineCoreOutput:
    """One request's news from one step: the sequences that progressed or ended."""

    request_id: str
    seqs: list[SeqDelta]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None  # the core refused the request (it can never fit in the KV cache)
    # Log-probs of the prompt tokens computed in this step (from the second prompt token on, in order)
    prompt_logprobs: list[TokenLogprob] | None = None
