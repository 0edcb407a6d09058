"""Usage in streamed answers: OpenAI's `stream_options.include_usage` (one last chunk, with no choices,
carrying the request's usage) and vLLM's `stream_options.continuous_usage_stats` (the usage so far in
every chunk). Both count the prompt tokens served from the prefix cache, as non-streamed usage does.

`continuous_usage_stats` works on its own: without `include_usage` every chunk carries the usage so far
and no usage-only chunk ends the stream.
"""

from __future__ import annotations

from typing import Any

from gptserve.server.errors import bad_request
from gptserve.server.openai_format import usage
from gptserve.server.openai_protocol import SamplingFields
from gptserve.server.streaming import ChoiceDelta


def check_stream_options(req: SamplingFields) -> None:
    """`stream_options` only make sense for a streamed answer: a 400 naming them otherwise."""
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")


class StreamUsage:
    """The usage of one streamed request as its choices advance."""

    def __init__(self, req: SamplingFields, num_prompt_tokens: int):
        options = req.stream_options
        self.include_usage = bool(options and options.include_usage)
        self.continuous = bool(options and options.continuous_usage_stats)
        self.num_prompt_tokens = num_prompt_tokens
        self._n = req.n
        self._output_tokens: dict[int, int] = {}  # choice index -> output tokens so far
        self._cached_tokens: dict[int, int] = {}  # prompt index -> prompt tokens from the prefix cache

    def update(self, delta: ChoiceDelta) -> None:
        self._output_tokens[delta.index] = delta.num_tokens
        self._cached_tokens[delta.index // self._n] = delta.num_cached_tokens

    def so_far(self) -> dict[str, Any]:
        completion_tokens = sum(self._output_tokens.values())
        return usage(self.num_prompt_tokens, completion_tokens, sum(self._cached_tokens.values()))

    def chunk_fields(self) -> dict[str, Any]:
        """What each chunk with choices carries: the usage so far (continuous), `usage: null` (OpenAI's
        form when only the last chunk has it) or nothing."""
        if self.continuous:
            return {"usage": self.so_far()}
        return {"usage": None} if self.include_usage else {}

    def final(self) -> dict[str, Any] | None:
        """The usage of the usage-only chunk that ends the stream, or None when there is none."""
        return self.so_far() if self.include_usage else None
