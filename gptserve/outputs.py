"""What the engine hands back: per-request results with text, token ids, finish reason and logprobs."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    """Log-probability of one generated token, with the `logprobs` most likely alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    rank: int | None = None  # 1 = the most likely token (prompt log-probs report it)


@dataclass
class CompletionOutput:
    """One generated sequence of a request (a request with `n > 1` or beams has several)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    cumulative_logprob: float = 0.0
    logprobs: list[TokenLogprob] | None = None
    delta_text: str = ""  # text added by the latest step (for streaming)
    delta_token_ids: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The state of one request after an engine step."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    error: str | None = None
    # With `prompt_logprobs`: per prompt token, its log-prob and alternatives (None for the first token)
    prompt_logprobs: list[TokenLogprob | None] | None = None
