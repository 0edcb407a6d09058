"""What the client sends and gets back, whatever the protocol."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gptserve.errors import GptServeError

Prompt = str | list[int]  # text, or token ids for models without a tokenizer
OnText = Callable[[str], None]  # called with each piece of text as it streams in


class ClientError(GptServeError):
    """A request the server refused or failed, with the server's own message."""


@dataclass
class Options:
    """Sampling options with OpenAI's meaning; each adapter translates them for its protocol.

    Unset fields take the server's defaults, except that with none of temperature, top-k and top-p set
    the client asks for greedy decoding on every protocol (FasterTransformer's end_to_end_test does too).
    """

    max_tokens: int = 64
    beam_width: int = 1
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    bad_words: list[str] = field(default_factory=list)
    stop_words: list[str] = field(default_factory=list)
    stream: bool = False
    json_schema: dict[str, Any] | None = None  # every answer must be JSON that this schema accepts
    json_schema_name: str = "schema"  # its name, where the protocol asks for one

    @property
    def greedy(self) -> bool:
        """True when decoding is greedy: nothing asked for sampling, or temperature 0."""
        unset = self.temperature is None and self.top_k is None and self.top_p is None
        return unset or self.temperature == 0.0 or self.top_k == 1


@dataclass
class Result:
    """One prompt's answer (or its error)."""

    index: int
    prompt: Prompt
    text: str = ""
    beams: list[str] = field(default_factory=list)  # every beam's text, best first
    token_ids: list[int] | None = None  # generated ids, when the protocol returns them
    num_tokens: int | None = None  # generated tokens, when the protocol tells
    finish_reason: str | None = None
    latency_s: float = 0.0
    ttft_s: float | None = None  # time to the first streamed text
    error: str | None = None

    def as_json(self) -> dict:
        """The result as a JSON-ready dict."""
        return {
            "index": self.index,
            "prompt": self.prompt,
            "text": self.text,
            "beams": self.beams,
            "token_ids": self.token_ids,
            "num_tokens": self.num_tokens,
            "finish_reason": self.finish_reason,
            "latency_s": round(self.latency_s, 4),
            "ttft_s": None if self.ttft_s is None else round(self.ttft_s, 4),
            "error": self.error,
        }
