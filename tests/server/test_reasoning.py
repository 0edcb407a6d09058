"""A reasoning model's thinking served apart from its answer (`--reasoning-parser`): the split of whole
outputs and of streamed ones cut anywhere, and over the real server with the official SDK (a tiny model
driven into a think-then-answer output by a regex constraint), with and without tool calls."""

from __future__ import annotations

import json

import openai
import pytest

from gptserve.server.chat_stream import ChatChoiceStream
from gptserve.server.reasoning import reasoning_parser
from gptserve.server.tool_parsers import HermesParser
from gptserve.server.tool_request import ToolPlan
from tests.server.conftest import start_tiny_gptj_server

QWEN3 = reasoning_parser("qwen3")
R1 = reasoning_parser("deepseek_r1")


@pytest.mark.parametrize(
    ("parser", "text", "reasoning", "content"),
    [
        (QWEN3, "<think>\nLet me see.\n</think>\n\nParis.", "Let me see.", "Paris."),
        (QWEN3, "Paris.", None, "Paris."),  # thinking switched off
        (QWEN3, "<think>still thinking", "still thinking", ""),
        (R1, "Let me see.</think>Paris.", "Let me see.", "Paris."),
        (R1, "no end tag", "no end tag", ""),
    ],
)
def test_split(parser, text, reasoning, content):
    assert parser.split(text) == (reasoning, content)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7])
def test_streamed_split_is_the_whole_split_wherever_the_text_is_cut(size):
    text = '<think>Weather needed.</think>Checking.<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    choice = ChatChoiceStream(ToolPlan(HermesParser(), "auto", []), QWEN3)
    deltas = []
    for i in range(0, len(text), size):
        deltas += choice.feed(text[i : i + size])
    more, finish = choice.finish("stop")
    deltas += more
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Weather needed."
    assert "".join(d.get("content", "") for d in deltas) == "Checking."
    (calls,) = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert calls[0]["function"]["name"] == "f" and finish == "tool_calls"


TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}<|assistant|>"
THINK_THEN_ANSWER = r"<think>The user greets me\.</think>Hello there\."


@pytest.fixture(scope="module")
def client(tiny_gptj_tokenized, tmp_path_factory):
    proc = start_tiny_gptj_server(
        tiny_gptj_tokenized, tmp_path_factory.mktemp("think"), "tiny-think", 256, TEMPLATE,
        "--reasoning-parser", "qwen3",
    )  # fmt: skip
    yield openai.OpenAI(base_url=f"{proc.url}/v1", api_key="unused", max_retries=0, timeout=120)
    assert proc.stop() == 0


def test_reasoning_content_over_the_api(client):
    args = dict(
        model="tiny-think", messages=[{"role": "user", "content": "Hi"}], max_tokens=60,
        extra_body={"guided_regex": THINK_THEN_ANSWER},
    )  # fmt: skip
    message = client.chat.completions.create(**args).choices[0].message
    assert message.content == "Hello there."
    assert message.model_extra["reasoning_content"] == "The user greets me."
    reasoning = content = ""
    for chunk in client.chat.completions.create(**args, stream=True):
        for c in chunk.choices:
            reasoning += (c.delta.model_extra or {}).get("reasoning_content") or ""
            content += c.delta.content or ""
    assert (reasoning, content) == ("The user greets me.", "Hello there.")


def test_tool_call_after_thinking(client):
    tools = [{"type": "function", "function": {"name": "greet", "parameters": {"type": "object"}}}]
    forced = r'<think>A tool\.</think><tool_call>\n\{"name": "greet", "arguments": \{\}\}\n</tool_call>'
    choice = client.chat.completions.create(
        model="tiny-think", messages=[{"role": "user", "content": "Hi"}], tools=tools, max_tokens=60,
        extra_body={"guided_regex": forced},
    ).choices[0]  # fmt: skip
    assert choice.finish_reason == "tool_calls"
    assert choice.message.model_extra["reasoning_content"] == "A tool."
    assert choice.message.tool_calls[0].function.name == "greet"
    assert json.loads(choice.message.tool_calls[0].function.arguments) == {}
