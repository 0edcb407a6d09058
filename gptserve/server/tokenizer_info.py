"""`GET /tokenizer_info` as vLLM serves it: the tokenizer's configuration (what `tokenizer_config.json`
holds, from the tokenizer object, file paths left out) with its class name and the chat template the server
renders with, so that a client can tokenize and template on its own side exactly as the server does.

Beyond vLLM's fields it always states the special tokens with their ids (`bos_token`, `bos_token_id`, ...
for bos, eos, pad and unk; null where the tokenizer has none), the server's context (`max_model_len`) and
the model's vocabulary (`vocab_size`: token ids 0 to `vocab_size - 1` are accepted). A model without a
tokenizer answers 200 too, with `tokenizer_class: null` and a `message` saying what is missing.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

SPECIAL_TOKENS = ("bos", "eos", "pad", "unk")
NO_TOKENIZER = (
    "this model has no tokenizer (its checkpoint ships no tokenizer files), so it takes prompts as token ids "
    "only: text prompts, chat, /tokenize and /detokenize need a tokenizer"
)
_LEFT_OUT = object()  # a value JSON cannot hold


def _plain(value: Any) -> Any:
    """`value` as JSON data: special tokens (`AddedToken`) become their text, containers are converted
    item by item, and anything else JSON cannot hold is left out."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    content = getattr(value, "content", None)
    if isinstance(content, str):
        return content
    if isinstance(value, dict):
        items = ((str(k), _plain(v)) for k, v in value.items())
        return {k: v for k, v in items if v is not _LEFT_OUT}
    if isinstance(value, list | tuple):
        return [v for v in map(_plain, value) if v is not _LEFT_OUT]
    return _LEFT_OUT


def tokenizer_info(
    tokenizer: PreTrainedTokenizerBase | None, chat_template: str | None, vocab_size: int, max_model_len: int
) -> dict[str, Any]:
    """The body of `GET /tokenizer_info`."""
    served = {"max_model_len": max_model_len, "vocab_size": vocab_size}
    if tokenizer is None:
        return {"tokenizer_class": None, "message": NO_TOKENIZER, "chat_template": chat_template, **served}
    config = {
        key: value
        for key, value in _plain(dict(getattr(tokenizer, "init_kwargs", None) or {})).items()
        if not key.endswith("_file")  # paths on the server's disk: vocab_file, merges_file, gguf_file, ...
    }
    for name in SPECIAL_TOKENS:
        config[f"{name}_token"] = getattr(tokenizer, f"{name}_token", None)
        config[f"{name}_token_id"] = getattr(tokenizer, f"{name}_token_id", None)
    config["tokenizer_class"] = type(tokenizer).__name__
    config["chat_template"] = chat_template
    return {**config, **served}
