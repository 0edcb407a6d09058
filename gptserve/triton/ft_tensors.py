"""FasterTransformer's token-level tensor interface, as pure functions over numpy arrays.

Requests arrive in the form of FasterTransformer's GPT-J backend: `input_ids` [B, L] padded, `input_lengths`,
`request_output_len`, optional sampling scalars ([B, 1], [B] or [1], one value for every row) and word
lists in FT's [B, 2, L] int32 format. Each batch row becomes one `SamplingParams`. Results go back as
`output_ids` [B, beam, L + max(request_output_len)] holding the prompt followed by the generated ids,
padded with `end_id`, `sequence_length` [B, beam] (prompt + generated) and, when asked, the log-probs.

Decoding semantics kept from FT: beam 1 with `runtime_top_k` 0 and `runtime_top_p` 0.0 is greedy, as is
`runtime_top_k` 1; `end_id` ends a sequence (the end token counts in `sequence_length`, as in FT). With
an `end_id` that is not one of the model's own end-of-sequence ids, only `end_id` ends a sequence, so the
model's EOS is ignored exactly as FT ignores it, for sampling and beams alike. Bad words, stop words,
`min_length` and the penalties apply to every beam on its own history, and beams report
`output_log_probs` that add up to their `cum_log_probs`. Each row generates its own `request_output_len`
tokens (FT generated the batch maximum for every row). `start_id` is the prompt of rows whose
`input_lengths` is 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gptserve.errors import InvalidRequestError
from gptserve.sampling_params import SamplingParams
from gptserve.triton.types import TritonError

# Optional per-row scalars of the FT GPT-J model (and the text form), by name.
SCALAR_INPUTS: dict[str, str] = {
    "runtime_top_k": "UINT32",
    "runtime_top_p": "FP32",
    "beam_search_diversity_rate": "FP32",
    "temperature": "FP32",
    "len_penalty": "FP32",
    "repetition_penalty": "FP32",
    "presence_penalty": "FP32",
    "frequency_penalty": "FP32",
    "min_length": "UINT32",
    "random_seed": "UINT64",
    "is_return_log_probs": "BOOL",
    "beam_width": "UINT32",
    "start_id": "UINT32",
    "end_id": "UINT32",
    "prompt_learning_task_name_ids": "UINT32",
    "top_p_decay": "FP32",
    "top_p_min": "FP32",
    "top_p_reset_ids": "UINT32",
}


@dataclass
class TokenRequest:
    """One FT request, parsed: a prompt, an output length and sampling parameters per row."""

    prompts: list[list[int]]
    max_input_len: int  # width of `input_ids`, which fixes where generated ids start in `output_ids`
    output_lens: list[int]
    params: list[SamplingParams]
    end_ids: list[int | None]
    return_log_probs: bool
    beam_width: int

    @property
    def batch_size(self) -> int:
        return len(self.prompts)


@dataclass
class BeamResult:
    """One generated sequence of a row: its new ids and their log-probs."""

    token_ids: list[int]
    cum_log_prob: float = 0.0
    log_probs: list[float] = field(default_factory=list)


def _shape(array: np.ndarray) -> str:
    return "[" + ", ".join(str(d) for d in array.shape) + "]"


def row_values(array: np.ndarray | None, name: str, batch: int) -> list[Any] | None:
    """A per-row scalar sent as [B, 1], [B], [1, 1], [1] or []: one Python value per row (None if absent)."""
    if array is None:
        return None
    flat = np.asarray(array).reshape(-1)
    per_row = array.ndim <= 2 and (array.ndim == 0 or array.shape[0] == batch) and flat.size == batch
    if flat.size == 1:
        return [flat[0].item()] * batch
    if not per_row:
        raise TritonError(
            f"input '{name}' has shape {_shape(array)}; expected one value per row ([{batch}, 1] or "
            f"[{batch}]) or one for all rows ([1])"
        )
    return [v.item() for v in flat]


def parse_word_list(array: np.ndarray | None, name: str, batch: int) -> list[list[list[int]]]:
    """FT word list [B, 2, L] (or [2, L] / [1, 2, L] for every row) -> per row, its words as token lists.

    Row 0 holds the ids of all words one after another, padded with 0; row 1 the cumulative end offset of
    each word, padded with -1. `[[0], [-1]]` is the empty list.
    """
    if array is None:
        return [[] for _ in range(batch)]
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[1] != 2:
        raise TritonError(f"input '{name}' has shape {_shape(array)}; expected [batch, 2, length]")
    if array.shape[0] not in (1, batch):
        raise TritonError(f"input '{name}' has {array.shape[0]} rows but the batch has {batch}")
    if not np.issubdtype(array.dtype, np.integer):
        raise TritonError(f"input '{name}' must hold integers, got {array.dtype}")
    rows = []
    for b, item in enumerate(array):
        ids, offsets = item[0].tolist(), item[1].tolist()
        words: list[list[int]] = []
        start = 0
        for end in offsets:
            if end < 0:
                break
            if end < start or end > len(ids):
                raise TritonError(
                    f"input '{name}' row {b}: word end offset {end} is out of order or beyond the "
                    f"{len(ids)} ids of the row"
                )
            word = ids[start:end]
            if any(t < 0 for t in word):
                raise TritonError(f"input '{name}' row {b}: token ids must be >= 0")
            if word:
                words.append(word)
            start = end
        rows.append(words)
    if len(rows) == 1 and batch > 1:
        rows = rows * batch
    return rows


def to_word_list(rows: list[list[list[int]]]) -> np.ndarray:
    """Per row, words as token lists -> FT word list [B, 2, L] int32 (the inverse of `parse_word_list`)."""
    width = max([1] + [sum(len(w) for w in words) for words in rows] + [len(words) for words in rows])
    out = np.zeros((len(rows), 2, width), dtype=np.int32)
    out[:, 1, :] = -1
    for b, words in enumerate(rows):
        flat = [t for w in words for t in w]
        out[b, 0, : len(flat)] = flat
        out[b, 1, : len(words)] = np.cumsum([len(w) for w in words], dtype=np.int64)
    return out


def _int(name: str, value: Any, minimum: int = 0) -> int:
    number = int(value)
    if number < minimum:
        raise TritonError(f"input '{name}' must be >= {minimum}, got {number}")
    return number


def sampling_params(
    inputs: Mapping[str, np.ndarray],
    max_tokens: list[int],
    eos_token_ids: set[int],
    default_end_id: int | None,
    extra: Mapping[str, Any] | None = None,
) -> tuple[list[SamplingParams], list[int | None]]:
    """The sampling scalars of a batch -> one `SamplingParams` per row and each row's end id.

    `extra` supplies scalars sent as request parameters instead of input tensors (inputs win).
    """
    batch = len(max_tokens)
    extra = extra or {}

    def values(name: str, default: Any, convert: Callable[[Any], Any]) -> list[Any]:
        array = inputs.get(name)
        if array is None and name in extra:
            array = np.asarray(extra[name])
        got = row_values(array, name, batch)
        return [default] * batch if got is None else [convert(v) for v in got]

    top_k = values("runtime_top_k", 0, lambda v: _int("runtime_top_k", v))
    top_p = values("runtime_top_p", 0.0, float)
    temperature = values("temperature", 1.0, float)
    repetition = values("repetition_penalty", 1.0, float)
    presence = values("presence_penalty", 0.0, float)
    frequency = values("frequency_penalty", 0.0, float)
    length_penalty = values("len_penalty", 1.0, float)
    diversity = values("beam_search_diversity_rate", 0.0, float)
    min_length = values("min_length", 0, lambda v: _int("min_length", v))
    seed = values("random_seed", None, lambda v: _int("random_seed", v))
    log_probs = values("is_return_log_probs", False, bool)
    beam = values("beam_width", 1, lambda v: _int("beam_width", v, 1))
    end_id = values("end_id", default_end_id, lambda v: _int("end_id", v))
    top_p_decay = values("top_p_decay", 1.0, float)
    bad_words = parse_word_list(inputs.get("bad_words_list"), "bad_words_list", batch)
    stop_words = parse_word_list(inputs.get("stop_words_list"), "stop_words_list", batch)

    params = []
    for i in range(batch):
        if not 0.0 <= top_p[i] <= 1.0:
            raise TritonError(f"input 'runtime_top_p' must be in [0, 1], got {top_p[i]}")
        if temperature[i] < 0.0:
            raise TritonError(f"input 'temperature' must be >= 0, got {temperature[i]}")
        if beam[i] > 1 and diversity[i] != 0.0:
            raise TritonError("input 'beam_search_diversity_rate' other than 0 is not supported")
        if top_p_decay[i] != 1.0:
            raise TritonError("input 'top_p_decay' (factual-nucleus sampling) is not supported")
        greedy = beam[i] == 1 and top_k[i] == 0 and top_p[i] == 0.0
        stop_ids = [] if end_id[i] is None else [end_id[i]]
        try:
            params.append(
                SamplingParams(
                    n=beam[i],
                    max_tokens=max_tokens[i],
                    temperature=0.0 if greedy else temperature[i],
                    top_k=top_k[i],
                    top_p=top_p[i] if top_p[i] > 0.0 else 1.0,
                    seed=seed[i],
                    repetition_penalty=repetition[i],
                    presence_penalty=presence[i],
                    frequency_penalty=frequency[i],
                    min_tokens=min(min_length[i], max_tokens[i]),
                    stop_token_ids=stop_ids,
                    ignore_eos=end_id[i] is not None and end_id[i] not in eos_token_ids,
                    stop_token_sequences=stop_words[i],
                    bad_words_ids=bad_words[i],
                    beam_width=beam[i],
                    length_penalty=length_penalty[i],
                    logprobs=0 if log_probs[i] else None,
                )
            )
        except InvalidRequestError as e:
            raise TritonError(f"invalid sampling parameter: {e}") from e
    return params, end_id


def parse_token_request(
    inputs: Mapping[str, np.ndarray],
    eos_token_ids: set[int],
    default_end_id: int | None,
    extra: Mapping[str, Any] | None = None,
) -> TokenRequest:
    """Validate and parse FT's token inputs (`input_ids`, `input_lengths`, `request_output_len`, ...)."""
    ids = inputs.get("input_ids")
    if ids is None:
        raise TritonError("input 'input_ids' is required")
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2:
        raise TritonError(f"input 'input_ids' has shape {_shape(ids)}; expected [batch, max_input_len]")
    if not np.issubdtype(ids.dtype, np.integer):
        raise TritonError(f"input 'input_ids' must hold integer token ids, got {ids.dtype}")
    if ids.size and ids.min() < 0:
        raise TritonError("input 'input_ids' holds a negative token id")
    batch, width = ids.shape
    if batch == 0:
        raise TritonError("input 'input_ids' has no rows")
    lengths = row_values(inputs.get("input_lengths"), "input_lengths", batch) or [width] * batch
    out_lens = row_values(inputs.get("request_output_len"), "request_output_len", batch)
    if out_lens is None:
        if extra and "max_tokens" in extra:
            out_lens = [extra["max_tokens"]] * batch
        else:
            raise TritonError("input 'request_output_len' is required")
    start_ids = row_values(inputs.get("start_id"), "start_id", batch) or [None] * batch
    prompts = []
    for i in range(batch):
        n = int(lengths[i])
        if n < 0 or n > width:
            raise TritonError(
                f"input 'input_lengths' row {i} is {n}, outside [0, {width}] (the width of input_ids)"
            )
        if int(out_lens[i]) <= 0:
            raise TritonError(f"input 'request_output_len' row {i} is {out_lens[i]}; it must be > 0")
        if n == 0:
            if start_ids[i] is None:
                raise TritonError(f"input 'input_lengths' row {i} is 0: an empty prompt needs 'start_id'")
            prompts.append([int(start_ids[i])])
        else:
            prompts.append([int(t) for t in ids[i, :n]])
    output_lens = [int(v) for v in out_lens]
    params, end_ids = sampling_params(inputs, output_lens, eos_token_ids, default_end_id, extra)
    widths = {p.beam_width for p in params}
    if len(widths) > 1:
        raise TritonError("input 'beam_width' must be the same for every row of a batch")
    return TokenRequest(
        prompts=prompts,
        max_input_len=width,
        output_lens=output_lens,
        params=params,
        end_ids=end_ids,
        return_log_probs=any(p.logprobs is not None for p in params),
        beam_width=widths.pop(),
    )


def assemble_outputs(request: TokenRequest, results: list[list[BeamResult]]) -> dict[str, np.ndarray]:
    """Per row, its beams -> FT's output tensors (log-prob tensors only when the request asked for them)."""
    batch, beams = request.batch_size, request.beam_width
    max_output_len = max(request.output_lens)
    total = request.max_input_len + max_output_len
    output_ids = np.zeros((batch, beams, total), dtype=np.uint32)
    sequence_length = np.zeros((batch, beams), dtype=np.uint32)
    cum_log_probs = np.zeros((batch, beams), dtype=np.float32)
    output_log_probs = np.zeros((batch, beams, max_output_len), dtype=np.float32)
    for b, prompt in enumerate(request.prompts):
        end_id = request.end_ids[b]
        output_ids[b] = 0 if end_id is None else end_id
        row = results[b] if b < len(results) else []
        for k in range(beams):
            beam = row[k] if k < len(row) else BeamResult([])
            seq = (prompt + beam.token_ids)[:total]
            output_ids[b, k, : len(seq)] = seq
            sequence_length[b, k] = len(seq)
            cum_log_probs[b, k] = beam.cum_log_prob
            lp = beam.log_probs[:max_output_len]
            output_log_probs[b, k, : len(lp)] = lp
    out = {"output_ids": output_ids, "sequence_length": sequence_length}
    if request.return_log_probs:
        out["cum_log_probs"] = cum_log_probs
        out["output_log_probs"] = output_log_probs
    return out
