"""One streamed chat choice, from engine text deltas to OpenAI's chunk deltas: reasoning first
(`reasoning_content`, when a reasoning parser is set), then the answer, whose tool calls are held back
and sent whole (`ToolStream`). A choice with neither sends its text as it comes."""

from __future__ import annotations

from typing import Any

from gptserve.server.reasoning import ReasoningParser, ReasoningStream
from gptserve.server.tool_request import ToolPlan
from gptserve.server.tool_stream import ToolStream


class ChatChoiceStream:
    def __init__(self, tools: ToolPlan, reasoning: ReasoningParser | None):
        self.tools = tools
        self.calls = ToolStream(tools) if tools.active else None
        self.thinking = ReasoningStream(reasoning) if reasoning is not None else None

    @property
    def plain(self) -> bool:
        """Text passes straight through (one chunk per engine delta, as without tools or reasoning)."""
        return self.calls is None and self.thinking is None

    def feed(self, text: str) -> list[dict[str, Any]]:
        """The deltas to send for `text`."""
        reasoning, content = self.thinking.feed(text) if self.thinking is not None else ("", text)
        return self._deltas(reasoning, content)

    def finish(self, reason: str | None) -> tuple[list[dict[str, Any]], str | None]:
        """At the choice's end: the deltas still held back, and OpenAI's finish reason."""
        reasoning, content = self.thinking.finish() if self.thinking is not None else ("", "")
        deltas = self._deltas(reasoning, content)
        if self.calls is None:
            return deltas, reason
        rest, tool_calls, parsed = self.calls.finish()
        if rest:
            deltas.append({"content": rest})
        if tool_calls:
            deltas.append({"tool_calls": tool_calls})
        return deltas, self.tools.finish_reason(reason, parsed)

    def _deltas(self, reasoning: str, content: str) -> list[dict[str, Any]]:
        deltas = [{"reasoning_content": reasoning}] if reasoning else []
        if self.calls is not None:
            content = self.calls.feed(content)
        if content:
            deltas.append({"content": content})
        return deltas
