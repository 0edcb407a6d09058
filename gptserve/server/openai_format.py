"""OpenAI's response pieces that depend on the tokenizer: token strings and bytes, logprobs, usage.

Completions report logprobs as parallel lists (`tokens`, `token_logprobs`, `top_logprobs`,
`text_offset`); chat reports a list of `{token, logprob, bytes, top_logprobs}`. A token's `bytes` are the
raw UTF-8 bytes it stands for, which for byte-level BPE may be part of one character.
"""

from __future__ import annotations

import re
from typing import Any

from transformers import PreTrainedTokenizerBase

from gptserve.outputs import TokenLogprob

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte -> printable-character table used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = 256 + extra
            extra += 1
    return {chr(c): b for b, c in table.items()}


class TokenText:
    """Token id -> (text, bytes), cached; the vocabulary is fixed for the life of the server."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self._byte_level = type(decoder).__name__ == "ByteLevel"
        self._byte_decoder = _byte_level_decoder()

    def _raw_bytes(self, token_id: int) -> bytes:
        tok = self.tokenizer
        if tok is None:
            return f"<{token_id}>".encode()
        piece = tok.convert_ids_to_tokens(token_id)
        if piece is None:
            return b""
        if self._byte_level and all(ch in self._byte_decoder for ch in piece):
            return bytes(self._byte_decoder[ch] for ch in piece)
        match = _BYTE_TOKEN.fullmatch(piece)
        if match:  # SentencePiece byte fallback
            return bytes([int(match.group(1), 16)])
        if "\u2581" in piece:  # SentencePiece word boundary
            return piece.replace("\u2581", " ").encode()
        return tok.decode([token_id]).encode()

    def get(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            raw = self._raw_bytes(token_id)
            hit = self._cache[token_id] = (raw.decode("utf-8", errors="replace"), list(raw))
        return hit

    def text(self, token_id: int) -> str:
        return self.get(token_id)[0]


def completion_logprobs(
    entries: list[TokenLogprob], tokens: TokenText, start_offset: int, num_top: int
) -> dict[str, Any]:
    """Completions-style logprobs for `entries`; `start_offset` is the text offset of the first token."""
    return _logprob_columns([(e.token_id, e) for e in entries], tokens, start_offset, num_top)


def echo_logprobs(
    prompt_token_ids: list[int], entries: list[TokenLogprob | None], tokens: TokenText, num_top: int
) -> dict[str, Any]:
    """Completions-style logprobs of an echoed prompt: the first token has none (null), as OpenAI's."""
    return _logprob_columns(list(zip(prompt_token_ids, entries, strict=True)), tokens, 0, num_top)


def _logprob_columns(
    items: list[tuple[int, TokenLogprob | None]], tokens: TokenText, offset: int, num_top: int
) -> dict[str, Any]:
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, e in items:
        text = tokens.text(token_id)
        out["tokens"].append(text)
        out["token_logprobs"].append(None if e is None else e.logprob)
        top: dict[str, float] | None = None
        if e is not None:
            top = {}
            for alt, lp in e.top[:num_top]:
                top.setdefault(tokens.text(alt), lp)
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def joined_logprobs(first: dict[str, Any], then: dict[str, Any]) -> dict[str, Any]:
    return {key: first[key] + then[key] for key in first}


def vllm_prompt_logprobs(
    entries: list[TokenLogprob | None], tokens: TokenText
) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's `prompt_logprobs`: per prompt token, null for the first, else {token id: {logprob, rank,
    decoded_token}} for the prompt's token and each alternative asked for."""
    out: list[dict[str, dict[str, Any]] | None] = []
    for e in entries:
        if e is None:
            out.append(None)
            continue
        item = {
            str(e.token_id): {"logprob": e.logprob, "rank": e.rank, "decoded_token": tokens.text(e.token_id)}
        }
        for rank, (alt, lp) in enumerate(e.top, 1):
            item.setdefault(str(alt), {"logprob": lp, "rank": rank, "decoded_token": tokens.text(alt)})
        out.append(item)
    return out


def chat_logprobs(entries: list[TokenLogprob], tokens: TokenText, num_top: int) -> dict[str, Any]:
    """Chat-style logprobs: `{"content": [{token, logprob, bytes, top_logprobs}]}`."""
    content = []
    for e in entries:
        text, raw = tokens.get(e.token_id)
        top = []
        for token_id, lp in e.top[:num_top]:
            t, b = tokens.get(token_id)
            top.append({"token": t, "logprob": lp, "bytes": b})
        content.append({"token": text, "logprob": e.logprob, "bytes": raw, "top_logprobs": top})
    return {"content": content}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out
