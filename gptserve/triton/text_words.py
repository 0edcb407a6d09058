"""`stop_words` and `bad_words` of the text form, as Triton's TensorRT-LLM backend takes them.

Each is a list of strings per row: a BYTES input of shape [batch, words] ([1, words], [words] or a
scalar for every row; empty strings are padding), which is also what a generate body's
`"stop_words": ["a", "b"]` becomes, or a request parameter holding a string or a list of strings for
every row (`stop`, the name of Triton's vLLM backend and of OpenAI, is read as `stop_words`).

A stop word ends its row's generation as soon as the generated text ends with it, and is left out of
the output, as OpenAI's `stop` is. A bad word is tokenized as written (no special tokens; in GPT-2-style
vocabularies " word", with its leading space, is the form that follows other text), and the model is
never allowed to produce that token sequence.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from gptserve.errors import InvalidRequestError
from gptserve.sampling_params import SamplingParams
from gptserve.triton.types import InferRequest, TritonError

WORD_INPUTS = ("stop_words", "bad_words")
PARAMETER_ALIASES = {"stop_words": ("stop_words", "stop"), "bad_words": ("bad_words",)}


def _text(value: Any, name: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise TritonError(f"input '{name}' holds bytes that are not UTF-8 text") from None
    if isinstance(value, str):
        return value
    raise TritonError(f"input '{name}' must hold strings, got {type(value).__name__}")


def _from_tensor(array: np.ndarray, name: str, batch: int) -> list[list[str]]:
    array = np.asarray(array)
    if array.dtype != object and array.dtype.kind not in "US":
        raise TritonError(f"input '{name}' must be BYTES (a list of strings per row), got {array.dtype}")
    if array.ndim <= 1:
        rows = [array.reshape(-1)]
    elif array.ndim == 2 and array.shape[0] in (1, batch):
        rows = list(array)
    else:
        raise TritonError(
            f"input '{name}' has shape {list(array.shape)}; expected [{batch}, words] (one list per row) "
            "or [1, words] (one list for every row)"
        )
    words = [[w for w in (_text(v, name) for v in row) if w] for row in rows]
    return words * batch if len(words) == 1 else words


def _from_parameter(value: Any, key: str, batch: int) -> list[list[str]]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(w, str) for w in items):
        raise TritonError(f"parameter '{key}' must be a string or a list of strings")
    return [[w for w in items if w]] * batch


def word_rows(
    inputs: Mapping[str, np.ndarray], parameters: Mapping[str, Any], name: str, batch: int
) -> tuple[list[list[str]], str]:
    """The words of `name` ("stop_words" or "bad_words") for each of `batch` rows, from the input tensor,
    else the request parameter (or its alias), else none; and where they came from, for messages."""
    if name in inputs:
        return _from_tensor(inputs[name], name, batch), f"input '{name}'"
    for key in PARAMETER_ALIASES[name]:
        if parameters.get(key) is not None:
            return _from_parameter(parameters[key], key, batch), f"parameter '{key}'"
    return [[] for _ in range(batch)], f"input '{name}'"


def with_words(
    request: InferRequest, params: list[SamplingParams], tokenize: Callable[[str], list[int]]
) -> list[SamplingParams]:
    """`params` (one per row) with the request's stop words added to `stop` and its bad words, as token
    sequences from `tokenize`, to `bad_words_ids`; raises `TritonError` naming the input at fault."""
    batch = len(params)
    stops, stop_source = word_rows(request.inputs, request.parameters, "stop_words", batch)
    bans, _ = word_rows(request.inputs, request.parameters, "bad_words", batch)
    tokens: dict[str, list[int]] = {}
    out = []
    for p, stop, bad in zip(params, stops, bans):
        for word in bad:
            if word not in tokens:
                tokens[word] = tokenize(word)
        try:
            p = dataclasses.replace(p, stop=[*p.stop, *stop]) if stop else p
        except InvalidRequestError as e:
            raise TritonError(f"{stop_source}: {e}") from e
        banned = [tokens[w] for w in bad if tokens[w]]
        if banned:
            p = dataclasses.replace(p, bad_words_ids=[*p.bad_words_ids, *banned])
        out.append(p)
    return out
