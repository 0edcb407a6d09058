"""Tool calling in a chat request: checking `tools` and `tool_choice`, putting the tools and earlier calls
in front of the model, constraining required and named calls, and reading the calls out of the output.

The tool list reaches the model through its chat template (`tools=`) when the template knows tools; a
template that does not (`generic`, e.g. the embedded SmolLM2's) gets them in a system message written
here, with the instructions of the Hermes format, and its earlier calls and results rendered as text
in that format. `tool_choice: "required"` and a named function are grammar-constrained (the parser's
format, the arguments following the function's `parameters` schema), so those calls always parse;
`"auto"` leaves the model free and parses what it wrote; `"none"` keeps the tools from the model.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from llguidance import LLMatcher

from gptserve.sampling_params import StructuredOutputs
from gptserve.server.errors import bad_request
from gptserve.server.openai_protocol import ChatCompletionRequest, Tool
from gptserve.server.tool_parsers import ParsedOutput, ToolParser

Mode = Literal["auto", "required", "named"]


def tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_calls_json(parsed: ParsedOutput) -> list[dict[str, Any]]:
    """The calls as OpenAI's `tool_calls` (arguments as JSON text), each with a fresh id."""
    return [
        {"id": tool_call_id(), "type": "function",
         "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
        for c in parsed.calls
    ]  # fmt: skip


def _check_parameters(tools: list[Tool]) -> None:
    for i, tool in enumerate(tools):
        parameters = tool.function.parameters
        if parameters is None:
            continue
        problem = LLMatcher.validate_grammar(LLMatcher.grammar_from_json_schema(parameters))
        if problem:
            where = f"tools[{i}].function.parameters"
            raise bad_request(f"{where} is not a schema this server can follow: {problem.strip()}", where)


def _system_prompt(tools: list[Tool]) -> str:
    listed = "\n".join(json.dumps(t.model_dump(exclude_none=True), ensure_ascii=False) for t in tools)
    return (
        "You can call functions to help answer. They are described as JSON schemas inside <tools></tools>:\n"
        f"<tools>\n{listed}\n</tools>\n"
        "To call a function, reply with a JSON object holding its name and arguments between "
        "<tool_call></tool_call> tags, one call per tag pair:\n"
        '<tool_call>\n{"name": <function name>, "arguments": <arguments as a JSON object>}\n</tool_call>'
    )


@dataclass
class ToolPlan:
    """What tool calling changes in one chat request."""

    parser: ToolParser
    mode: Mode | None  # None: the output is plain text (no tools, or tool_choice "none")
    tools: list[Tool]
    constraint: StructuredOutputs | None = None

    @property
    def active(self) -> bool:
        return self.mode is not None

    def template_kwargs(self) -> dict[str, Any]:
        """What the chat template gets beside the messages."""
        if not self.active or not self.parser.template_knows_tools:
            return {}
        return {"tools": [t.model_dump(exclude_none=True) for t in self.tools]}

    def messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """`messages` (plain dicts) ready for the template: earlier calls' arguments as objects (what
        templates expect), or, for a template without tools, calls and results written as text."""
        out = [self._message(m) for m in messages]
        if self.active and not self.parser.template_knows_tools:
            prompt = _system_prompt(self.tools)
            if out and out[0].get("role") == "system":
                out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{prompt}".strip()}
            else:
                out.insert(0, {"role": "system", "content": prompt})
        return out

    def _message(self, message: dict[str, Any]) -> dict[str, Any]:
        role, calls = message.get("role"), message.get("tool_calls")
        if self.parser.template_knows_tools:
            if role == "assistant" and calls:
                message = {**message, "tool_calls": [_arguments_as_object(c) for c in calls]}
            return message
        if role == "assistant" and calls:
            texts = [message.get("content") or ""]
            for call in calls:
                function = call.get("function") or {}
                arguments = function.get("arguments") or "{}"
                if not isinstance(arguments, str):
                    arguments = json.dumps(arguments, ensure_ascii=False)
                texts.append(self.parser.call_text(str(function.get("name", "")), arguments))
            rest = {k: v for k, v in message.items() if k != "tool_calls"}
            return {**rest, "content": "\n".join(t for t in texts if t)}
        if role == "tool":
            return {
                "role": "user",
                "content": f"<tool_response>\n{message.get('content') or ''}\n</tool_response>",
            }
        return message

    def parse(self, text: str) -> ParsedOutput | None:
        """The calls in one choice's text, or None (plain text)."""
        return self.parser.parse(text) if self.active else None

    def finish_reason(self, reason: str | None, parsed: ParsedOutput | None) -> str | None:
        """OpenAI's: "tool_calls" when the model ended by calling tools (a named call ends with "stop")."""
        if parsed is not None and reason == "stop" and self.mode != "named":
            return "tool_calls"
        return reason


def _arguments_as_object(call: Any) -> Any:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        return call
    arguments = call["function"].get("arguments")
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except ValueError:
            return call
        return {**call, "function": {**call["function"], "arguments": parsed}}
    return call


def plan_tools(req: ChatCompletionRequest, parser: ToolParser) -> ToolPlan:
    """Check `tools` / `tool_choice` / `parallel_tool_calls` and decide how the request uses tools."""
    tools = req.tools or []
    choice = req.tool_choice
    if choice is not None and choice != "none" and not tools:
        raise bad_request("tool_choice needs tools", "tool_choice")
    if not tools or choice == "none":
        return ToolPlan(parser, None, tools)
    names = [t.function.name for t in tools]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise bad_request(f"tools name the function {duplicated[0]!r} more than once", "tools")
    _check_parameters(tools)
    if choice is None or choice == "auto":
        return ToolPlan(parser, "auto", tools)
    if choice == "required":
        functions = [(t.function.name, t.function.parameters) for t in tools]
        grammar = parser.grammar(functions, req.parallel_tool_calls)
        return ToolPlan(parser, "required", tools, StructuredOutputs(grammar=grammar, param="tool_choice"))
    wanted = choice.function.name
    if wanted not in names:
        raise bad_request(
            f"tool_choice names the function {wanted!r}, which is not among tools", "tool_choice"
        )
    tool = tools[names.index(wanted)]
    grammar = parser.grammar([(wanted, tool.function.parameters)], False)
    return ToolPlan(parser, "named", [tool], StructuredOutputs(grammar=grammar, param="tool_choice"))
