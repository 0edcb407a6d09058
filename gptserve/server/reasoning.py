"""Reasoning models' thinking, served apart from the answer: the text between `<think>` and `</think>`
becomes the message's `reasoning_content` (vLLM's field), the rest its `content`.

`--reasoning-parser` picks the convention:
- `qwen3`: thinking is what the output writes between `<think>` and `</think>`; an output without the tags
  is all answer (Qwen 3 with `enable_thinking: false` in `chat_template_kwargs`);
- `deepseek_r1`: the chat template opens `<think>` in the prompt, so the output starts inside the thinking;
  everything up to `</think>` is reasoning (all of it, if the tag never comes).
`ReasoningStream` does the same for a streamed choice, holding back a tail that may be part of a tag.
"""

from __future__ import annotations

from dataclasses import dataclass

REASONING_PARSERS = ("none", "qwen3", "deepseek_r1")
THINK_START, THINK_END = "<think>", "</think>"


@dataclass(frozen=True)
class ReasoningParser:
    starts_inside: bool  # the prompt opened the thinking (deepseek_r1)

    def split(self, text: str) -> tuple[str | None, str]:
        """(reasoning, content) of a whole output; reasoning None when there is none."""
        stream = ReasoningStream(self)
        reasoning, content = stream.feed(text)
        more_reasoning, more_content = stream.finish()
        reasoning += more_reasoning
        content += more_content
        return (reasoning.strip() or None) if stream.saw_reasoning else None, content.lstrip("\n")


def reasoning_parser(name: str) -> ReasoningParser | None:
    """The parser `--reasoning-parser` names (None for "none")."""
    if name == "none":
        return None
    if name not in REASONING_PARSERS:
        raise ValueError(f"unknown reasoning parser {name!r}; expected one of {', '.join(REASONING_PARSERS)}")
    return ReasoningParser(starts_inside=name == "deepseek_r1")


class ReasoningStream:
    """One choice's text as it comes, split into reasoning and content deltas."""

    def __init__(self, parser: ReasoningParser):
        self.inside = parser.starts_inside  # within the thinking now
        self.before = not parser.starts_inside  # no tag seen yet, and `<think>` may still open it
        self.saw_reasoning = parser.starts_inside
        self.pending = ""  # text held back: it may be the start of a tag

    def feed(self, delta: str) -> tuple[str, str]:
        """(reasoning, content) to send for `delta`."""
        text = self.pending + delta
        self.pending = ""
        reasoning, content = [], []
        while text:
            tag = THINK_END if self.inside else THINK_START
            if not self.inside and not self.before:  # the thinking is over: the rest is answer
                content.append(text)
                break
            at = text.find(tag)
            if at >= 0:
                (reasoning if self.inside else content).append(text[:at])
                text = text[at + len(tag) :]
                if self.inside:
                    self.inside = False
                else:
                    self.inside, self.before, self.saw_reasoning = True, False, True
                continue
            keep = _partial_tag_tail(text, tag)
            (reasoning if self.inside else content).append(text[: len(text) - keep])
            self.pending = text[len(text) - keep :]
            break
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """What was held back, at the end of the output."""
        rest, self.pending = self.pending, ""
        return (rest, "") if self.inside else ("", rest)


def _partial_tag_tail(text: str, tag: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `tag`."""
    for keep in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-keep:]):
            return keep
    return 0
