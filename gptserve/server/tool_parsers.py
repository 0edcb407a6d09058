"""Tool-call formats: how a model writes a function call, how to find the calls in its output, and the
grammar that makes a required or named call always parse.

One parser per format models are trained on:
- `hermes`: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` (Hermes, Qwen 2.5/3); also the
  format of `generic`, used when the chat template knows no tools (its tool list and the instructions
  then go to the model in a system message, see `tool_request.py`);
- `llama3_json`: `{"name": ..., "parameters": {...}}`, optionally after `<|python_tag|>`, calls joined by
  `; ` (Llama 3.1 / 3.2);
- `mistral`: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`.
`choose_parser` picks one from the chat template's text unless `--tool-call-parser` names it.

The grammars are Lark with llguidance's `%json` rules: the call's frame and the function's name are fixed
text, its arguments follow the function's `parameters` schema (each schema is its own rule, so its
`$ref`s resolve inside it).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from gptserve.engine.grammar import DEFAULT_JSON_WHITESPACE

PARSER_NAMES = ("auto", "hermes", "llama3_json", "mistral", "generic")
_ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass
class ParsedCall:
    name: str
    arguments: dict[str, Any]


@dataclass
class ParsedOutput:
    content: str | None  # the text outside the calls; None when there is none
    calls: list[ParsedCall]


def _lit(text: str) -> str:
    """A Lark string literal."""
    return json.dumps(text, ensure_ascii=False)


def _args_rule(name: str, parameters: dict[str, Any] | None) -> str:
    schema = dict(parameters or _ANY_OBJECT)
    schema.setdefault(
        "x-guidance", {"whitespace_flexible": False, "whitespace_pattern": DEFAULT_JSON_WHITESPACE}
    )
    return f"{name}: %json{json.dumps(schema, ensure_ascii=False)}"


def _decode_objects(text: str, separators: str) -> list[Any] | None:
    """The JSON values of `text`, one after another with `separators` characters between them; None if
    anything else is there."""
    decoder = json.JSONDecoder()
    values, i = [], 0
    while True:
        while i < len(text) and text[i] in separators:
            i += 1
        if i == len(text):
            return values
        try:
            value, i = decoder.raw_decode(text, i)
        except ValueError:
            return None
        values.append(value)


def _call(obj: Any, args_key: str) -> ParsedCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    return ParsedCall(obj["name"], arguments) if isinstance(arguments, dict) else None


class ToolParser:
    """One tool-call format."""

    name = ""
    args_key = "arguments"
    # Text that opens the calls; `at_start`: only when the output begins with it (after whitespace).
    markers: tuple[str, ...] = ()
    at_start = False
    template_knows_tools = True  # False: the tool list goes to the model in a system message
    # The marker is a special token in the model's vocabulary, which the text would otherwise drop.
    marker_is_special = False

    def parse(self, text: str) -> ParsedOutput | None:
        """The calls in a whole output, or None if it holds none (or none that parses)."""
        raise NotImplementedError

    def call_text(self, name: str, arguments: str) -> str:
        """How the model writes one call (to render an earlier assistant turn)."""
        raise NotImplementedError

    def grammar(self, functions: list[tuple[str, dict[str, Any] | None]], parallel: bool) -> str:
        """Lark grammar of one call (several if `parallel`) to one of `functions` (name, parameters)."""
        raise NotImplementedError

    def marker_start(self, text: str) -> int | None:
        """Where the calls begin in `text`, if they have begun."""
        if self.at_start:
            stripped = text.lstrip()
            offset = len(text) - len(stripped)
            return offset if any(stripped.startswith(m) for m in self.markers) else None
        found = [i for i in (text.find(m) for m in self.markers) if i >= 0]
        return min(found) if found else None

    def safe_prefix(self, text: str) -> int:
        """How much of `text` (no marker in it) can be streamed as content: all but a tail that could
        still become a marker."""
        if self.at_start:
            stripped = text.lstrip()
            if any(m.startswith(stripped) for m in self.markers):
                return 0
            return len(text)
        for keep in range(min(len(text), max(len(m) for m in self.markers) - 1), 0, -1):
            if any(m.startswith(text[-keep:]) for m in self.markers):
                return len(text) - keep
        return len(text)


class HermesParser(ToolParser):
    name = "hermes"
    markers = ("<tool_call>",)
    _block = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str) -> ParsedOutput | None:
        start = text.find("<tool_call>")
        if start < 0:
            return None
        calls = []
        for body in self._block.findall(text[start:]):
            call = _call(_first_json(body), self.args_key)
            if call is None:
                return None
            calls.append(call)
        content = text[:start].strip()
        return ParsedOutput(content or None, calls) if calls else None

    def call_text(self, name: str, arguments: str) -> str:
        return f'<tool_call>\n{{"name": {json.dumps(name)}, "arguments": {arguments}}}\n</tool_call>'

    def grammar(self, functions: list[tuple[str, dict[str, Any] | None]], parallel: bool) -> str:
        rules = ['start: call ("\\n" call)*' if parallel else "start: call"]
        rules.append("call: " + " | ".join(f"call{i}" for i in range(len(functions))))
        for i, (name, parameters) in enumerate(functions):
            head = _lit(f'<tool_call>\n{{"name": {json.dumps(name)}, "arguments": ')
            rules.append(f"call{i}: {head} args{i} {_lit('}' + chr(10) + '</tool_call>')}")
            rules.append(_args_rule(f"args{i}", parameters))
        return "\n".join(rules)


class GenericParser(HermesParser):
    """Hermes's format for a template that knows no tools: the server describes them to the model."""

    name = "generic"
    template_knows_tools = False


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    args_key = "parameters"
    markers = ("<|python_tag|>", "{")
    at_start = True

    def parse(self, text: str) -> ParsedOutput | None:
        body = text.strip().removeprefix("<|python_tag|>").strip()
        values = _decode_objects(body, "; \n")
        if not values:
            return None
        calls = [_call(v, self.args_key) for v in values]
        if any(c is None for c in calls):
            return None
        return ParsedOutput(None, calls)  # type: ignore[arg-type]

    def call_text(self, name: str, arguments: str) -> str:
        return f'{{"name": {json.dumps(name)}, "parameters": {arguments}}}'

    def grammar(self, functions: list[tuple[str, dict[str, Any] | None]], parallel: bool) -> str:
        rules = ['start: call ("; " call)*' if parallel else "start: call"]
        rules.append("call: " + " | ".join(f"call{i}" for i in range(len(functions))))
        for i, (name, parameters) in enumerate(functions):
            head = _lit(f'{{"name": {json.dumps(name)}, "parameters": ')
            rules.append(f'call{i}: {head} args{i} "}}"')
            rules.append(_args_rule(f"args{i}", parameters))
        return "\n".join(rules)


class MistralParser(ToolParser):
    name = "mistral"
    markers = ("[TOOL_CALLS]",)
    marker_is_special = True

    def parse(self, text: str) -> ParsedOutput | None:
        start = text.find("[TOOL_CALLS]")
        if start < 0:
            return None
        values = _decode_objects(text[start + len("[TOOL_CALLS]") :], " \n")
        if not values:
            return None
        flat = [v for value in values for v in (value if isinstance(value, list) else [value])]
        calls = [_call(v, self.args_key) for v in flat]
        if not calls or any(c is None for c in calls):
            return None
        content = text[:start].strip()
        return ParsedOutput(content or None, calls)  # type: ignore[arg-type]

    def call_text(self, name: str, arguments: str) -> str:
        return f'[TOOL_CALLS][{{"name": {json.dumps(name)}, "arguments": {arguments}}}]'

    def grammar(self, functions: list[tuple[str, dict[str, Any] | None]], parallel: bool) -> str:
        rules = [
            'start: "[TOOL_CALLS][" call (", " call)* "]"' if parallel else 'start: "[TOOL_CALLS][" call "]"'
        ]
        rules.append("call: " + " | ".join(f"call{i}" for i in range(len(functions))))
        for i, (name, parameters) in enumerate(functions):
            head = _lit(f'{{"name": {json.dumps(name)}, "arguments": ')
            rules.append(f'call{i}: {head} args{i} "}}"')
            rules.append(_args_rule(f"args{i}", parameters))
        return "\n".join(rules)


def _first_json(text: str) -> Any:
    values = _decode_objects(text.strip(), " \n")
    return values[0] if values and len(values) == 1 else None


PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesParser, GenericParser, Llama3JsonParser, MistralParser)
}


def choose_parser(template_source: str | None, override: str = "auto") -> ToolParser:
    """The parser named by `override`, or (for "auto") the one the chat template's text shows: a template
    that writes none of the known formats gets `generic`."""
    if override != "auto":
        return PARSERS[override]()
    source = template_source or ""
    if "<tool_call>" in source:
        return HermesParser()
    if "[TOOL_CALLS]" in source:
        return MistralParser()
    if "<|python_tag|>" in source or ("tools" in source and '"parameters"' in source):
        return Llama3JsonParser()
    return GenericParser()
