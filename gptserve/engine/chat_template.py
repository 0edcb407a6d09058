"""Chat templates: turn a list of messages into the prompt text the model was trained on.

The template comes from the model (GGUF metadata, `tokenizer_config.json` or `chat_template.jinja`, as the
loader found it) or from `--chat-template`, and is rendered in jinja2's `ImmutableSandboxedEnvironment`:
a template is code from a checkpoint, so it must not reach Python internals or mutate its inputs. The
input processor renders it; messages it refuses are `InvalidRequestError`s naming `messages`.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gptserve.errors import GptServeError, InvalidRequestError


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False
):
    # Templates written for Hugging Face expect its `tojson` (no HTML escaping, unicode kept).
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def load_template_source(override: str | None, model_template: Any) -> str | None:
    """The template text to use: `--chat-template` (a file, or the template itself) over the model's."""
    if override:
        path = Path(override)
        if path.is_file():
            return path.read_text(encoding="utf-8")
        if "{{" in override or "{%" in override:
            return override
        raise GptServeError(f"--chat-template {override!r}: no such file")
    if isinstance(model_template, dict):  # named templates: the plain one is "default"
        model_template = model_template.get("default")
    elif isinstance(model_template, list):
        named = {t.get("name"): t.get("template") for t in model_template if isinstance(t, dict)}
        model_template = named.get("default")
    return model_template or None


class ChatTemplate:
    """A compiled chat template plus the special tokens it may refer to."""

    def __init__(self, source: str | None, special_tokens: dict[str, str | None] | None = None):
        self.source = source
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self._template: jinja2.Template | None = None
        if source is not None:
            try:
                self._template = _environment().from_string(source)
            except jinja2.TemplateSyntaxError as e:
                raise GptServeError(f"chat template does not compile: {e} (line {e.lineno})") from None

    @property
    def available(self) -> bool:
        return self._template is not None

    def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> str:
        """The prompt text for `messages`; an `InvalidRequestError` if the template refuses them."""
        if self._template is None:
            raise InvalidRequestError(
                "this model has no chat template: start the server with --chat-template FILE, "
                "or use /v1/completions",
                "messages",
                "chat_template_missing",
            )
        if continue_final_message and add_generation_prompt:
            raise InvalidRequestError(
                "continue_final_message and add_generation_prompt cannot both be true",
                "continue_final_message",
            )
        context = dict(extra or {})
        context.update(self.special_tokens)
        context.update(messages=messages, add_generation_prompt=add_generation_prompt)
        try:
            text = self._template.render(**context)
        except jinja2.TemplateError as e:  # raise_exception() in the template, or a sandbox refusal
            raise InvalidRequestError(f"chat template error: {e}", "messages") from None
        if continue_final_message:
            final = messages[-1].get("content") or ""
            cut = text.rfind(final) if final else -1
            if cut < 0:
                raise InvalidRequestError(
                    "the final message's content is not in the rendered prompt", "messages"
                )
            text = text[: cut + len(final)]
        return text
