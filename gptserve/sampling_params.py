"""`SamplingParams`: every per-request decoding option, validated once when the request is made."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from gptserve.errors import InvalidRequestError

# Bounds that keep one request from monopolising the server; the HTTP layer reports them as 400s.
MAX_N = 128
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_LOGIT_BIAS_ENTRIES = 1024


@dataclass(frozen=True)
class StructuredOutputs:
    """A constraint on what a request may generate: exactly one of a JSON schema (`json`, a dict or its
    text), any JSON object (`json_object`), a regular expression, a list of choices, or a grammar (Lark,
    or GBNF/EBNF as llama.cpp writes it). `whitespace_pattern` (a regex) replaces the whitespace JSON
    allows between tokens, which is otherwise bounded so that a model cannot loop on it ("": none at all,
    compact JSON). `param` names
    the request field the constraint came from, for errors."""

    json: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    whitespace_pattern: str | None = None
    param: str = field(default="structured_outputs", compare=False)

    def __post_init__(self) -> None:
        if self.choice is not None and not isinstance(self.choice, tuple):
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [
            name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None
        ] + (["json_object"] if self.json_object else [])
        if len(given) != 1:
            what = ", ".join(given) if given else "none"
            raise InvalidRequestError(
                f"{self.param} must hold exactly one of json, json_object, regex, choice or grammar "
                f"(got {what})",
                self.param,
            )
        if isinstance(self.json, str):
            try:
                schema = json.loads(self.json)
            except ValueError as e:
                raise InvalidRequestError(
                    f"{self.param}: the JSON schema is not valid JSON: {e}", self.param
                ) from None
            object.__setattr__(self, "json", schema)
        if self.json is not None and not isinstance(self.json, dict | bool):
            raise InvalidRequestError(f"{self.param}: a JSON schema must be an object", self.param)
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise InvalidRequestError(f"{self.param}: {name} must be a non-empty string", self.param)
        if self.whitespace_pattern is not None and not isinstance(self.whitespace_pattern, str):
            raise InvalidRequestError(f"{self.param}: whitespace_pattern must be a string", self.param)
        if self.choice is not None and (
            not self.choice or not all(isinstance(c, str) and c for c in self.choice)
        ):
            raise InvalidRequestError(
                f"{self.param}: choice must be a non-empty list of non-empty strings", self.param
            )

    @property
    def key(self) -> str:
        """The constraint as canonical text: equal constraints compile once."""
        fields = {
            "json": self.json,
            "json_object": self.json_object,
            "regex": self.regex,
            "choice": self.choice,
            "grammar": self.grammar,
            "whitespace_pattern": self.whitespace_pattern,
        }
        return json.dumps(fields, sort_keys=True)


@dataclass
class SamplingParams:
    """How to pick the next tokens of one request.

    `temperature=0` means greedy. `top_k` of 0 or -1 disables top-k. `beam_width > 1` switches to beam
    search (the FasterTransformer option), in which case sampling fields other than the penalties are
    ignored and `n` beams are returned (`n <= beam_width`). `prompt_logprobs` asks for the log-probability
    of every prompt token after the first (with that many alternatives each); with it, `max_tokens=0`
    scores the prompt without generating. `structured_outputs` constrains the output to a JSON schema,
    a regex, a choice or a grammar.
    """

    n: int = 1
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    stop_token_sequences: list[list[int]] = field(default_factory=list)
    bad_words_ids: list[list[int]] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    beam_width: int = 1
    length_penalty: float = 1.0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputs | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        self._validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def use_beam_search(self) -> bool:
        return self.beam_width > 1

    def _check(self, ok: bool, param: str, message: str) -> None:
        if not ok:
            raise InvalidRequestError(f"{param} {message}", param=param)

    def _validate(self) -> None:
        c = self._check
        c(
            isinstance(self.n, int) and 1 <= self.n <= MAX_N,
            "n",
            f"must be an integer in [1, {MAX_N}], got {self.n!r}",
        )
        least = 0 if self.prompt_logprobs is not None else 1  # 0: score the prompt only
        c(
            self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= least),
            "max_tokens",
            f"must be a positive integer, got {self.max_tokens!r}"
            if least
            else f"must be an integer >= 0, got {self.max_tokens!r}",
        )
        c(0.0 <= self.temperature <= 100.0, "temperature", f"must be in [0, 100], got {self.temperature}")
        c(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")
        c(
            isinstance(self.top_k, int) and self.top_k >= -1,
            "top_k",
            f"must be -1, 0 or positive, got {self.top_k!r}",
        )
        c(0.0 <= self.min_p <= 1.0, "min_p", f"must be in [0, 1], got {self.min_p}")
        c(
            -2.0 <= self.presence_penalty <= 2.0,
            "presence_penalty",
            f"must be in [-2, 2], got {self.presence_penalty}",
        )
        c(
            -2.0 <= self.frequency_penalty <= 2.0,
            "frequency_penalty",
            f"must be in [-2, 2], got {self.frequency_penalty}",
        )
        c(
            0.0 < self.repetition_penalty <= 10.0,
            "repetition_penalty",
            f"must be in (0, 10], got {self.repetition_penalty}",
        )
        c(
            self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**64),
            "seed",
            f"must be an integer in [0, 2**64), got {self.seed!r}",
        )
        c(len(self.stop) <= MAX_STOP_STRINGS, "stop", f"may hold at most {MAX_STOP_STRINGS} strings")
        c(all(isinstance(s, str) and s for s in self.stop), "stop", "entries must be non-empty strings")
        c(
            all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids",
            "must be token ids >= 0",
        )
        c(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens", "must be an integer >= 0")
        c(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            "min_tokens",
            f"({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
        )
        c(
            self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS),
            "logprobs",
            f"must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}",
        )
        c(
            self.prompt_logprobs is None
            or (isinstance(self.prompt_logprobs, int) and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
            "prompt_logprobs",
            f"must be an integer in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs!r}",
        )
        c(
            self.prompt_logprobs is None or self.beam_width == 1,
            "prompt_logprobs",
            "is not served with beam search",
        )
        c(
            self.structured_outputs is None or self.beam_width == 1,
            "structured_outputs",
            "is not served with beam search",
        )
        bias = self.logit_bias or {}
        c(
            len(bias) <= MAX_LOGIT_BIAS_ENTRIES,
            "logit_bias",
            f"may hold at most {MAX_LOGIT_BIAS_ENTRIES} entries",
        )
        c(all(-100.0 <= v <= 100.0 for v in bias.values()), "logit_bias", "values must be in [-100, 100]")
        c(all(k >= 0 for k in bias), "logit_bias", "keys must be token ids >= 0")
        c(
            isinstance(self.beam_width, int) and 1 <= self.beam_width <= MAX_N,
            "beam_width",
            f"must be in [1, {MAX_N}]",
        )
        c(
            self.beam_width == 1 or self.n <= self.beam_width,
            "n",
            f"({self.n}) must not exceed beam_width ({self.beam_width})",
        )
        for name, seqs in (
            ("stop_token_sequences", self.stop_token_sequences),
            ("bad_words_ids", self.bad_words_ids),
        ):
            c(
                all(len(s) > 0 and all(t >= 0 for t in s) for s in seqs),
                name,
                "must be non-empty lists of token ids",
            )

    def check_vocab(self, vocab_size: int) -> None:
        """Reject token ids the model does not have (called once the model is known)."""
        for name, ids in (
            ("logit_bias", list((self.logit_bias or {}).keys())),
            ("stop_token_ids", self.stop_token_ids),
            ("bad_words_ids", [t for s in self.bad_words_ids for t in s]),
        ):
            bad = [t for t in ids if t >= vocab_size]
            self._check(not bad, name, f"holds token id {bad[:1]} outside the vocabulary of {vocab_size}")
