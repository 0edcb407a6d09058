"""Streaming one chat choice that may call tools: text is sent as content until the parser's marker
appears (a tail that could still become the marker is held back); from the marker on, the output is
held until the choice ends and then sent as OpenAI tool-call deltas (one per call, with its id, name
and whole arguments). An output that turns out to hold no call that parses is sent as content then.
Required and named calls are held from the first token (their whole output is the calls)."""

from __future__ import annotations

from typing import Any

from gptserve.server.tool_parsers import ParsedOutput
from gptserve.server.tool_request import ToolPlan, tool_calls_json


class ToolStream:
    """The state of one streamed choice."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.text = ""  # everything generated so far
        self.sent = 0  # characters of `text` already sent as content
        self.calling = plan.mode in ("required", "named")  # the calls have begun: hold everything

    def feed(self, delta: str) -> str:
        """Content to send now for `delta`."""
        self.text += delta
        if self.calling:
            return ""
        pending = self.text[self.sent :]
        start = self.plan.parser.marker_start(self.text)
        if start is not None and start >= self.sent:
            self.calling = True
            out = self.text[self.sent : start]
            self.sent = start
            return out
        cut = self.plan.parser.safe_prefix(pending) if start is None else 0
        out = pending[:cut]
        self.sent += cut
        return out

    def finish(self) -> tuple[str, list[dict[str, Any]], ParsedOutput | None]:
        """At the end: content still to send, the tool-call deltas, and the parsed calls (None: none)."""
        parsed = self.plan.parse(self.text)
        if parsed is None:
            rest, self.sent = self.text[self.sent :], len(self.text)
            return rest, [], None
        calls = [{"index": i, **call} for i, call in enumerate(tool_calls_json(parsed))]
        return "", calls, parsed
