"""The tool-call formats: reading calls out of each format's text, the parser chosen from a chat template,
the grammars llguidance accepts, and the streamed hold-back that never sends part of a call as content."""

from __future__ import annotations

import pytest
from llguidance import LLMatcher, grammar_from

from gptserve.server.tool_parsers import (
    PARSERS,
    GenericParser,
    HermesParser,
    Llama3JsonParser,
    MistralParser,
    choose_parser,
)
from gptserve.server.tool_request import ToolPlan
from gptserve.server.tool_stream import ToolStream

CASES = [
    (
        HermesParser(),
        'Sure.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n'
        '<tool_call>{"name": "g", "arguments": {}}</tool_call>',
        "Sure.",
    ),
    (
        Llama3JsonParser(),
        '<|python_tag|>{"name": "f", "parameters": {"a": 1}}; {"name": "g", "parameters": {}}',
        None,
    ),
    (
        MistralParser(),
        '[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {}}]',
        None,
    ),
]


@pytest.mark.parametrize(("parser", "text", "content"), CASES)
def test_parse(parser, text, content):
    parsed = parser.parse(text)
    assert parsed.content == content
    assert [(c.name, c.arguments) for c in parsed.calls] == [("f", {"a": 1}), ("g", {})]


@pytest.mark.parametrize("parser", [p() for p in PARSERS.values()])
def test_plain_text_and_broken_calls_are_not_calls(parser):
    assert parser.parse("The weather is fine.") is None
    assert parser.parse(parser.call_text("f", '{"a": ')) is None


@pytest.mark.parametrize("parser", [p() for p in PARSERS.values()])
@pytest.mark.parametrize("parallel", [True, False])
def test_grammars_compile_and_accept_the_format(parser, parallel):
    functions = [
        ("f", {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}),
        ("g", None),
    ]
    grammar = grammar_from("grammar", parser.grammar(functions, parallel))
    assert LLMatcher.validate_grammar(grammar) == ""
    parsed = parser.parse(parser.call_text("f", '{"a": 1}'))
    assert [(c.name, c.arguments) for c in parsed.calls] == [("f", {"a": 1})]


def test_choose_parser():
    assert choose_parser("{% if tools %}<tool_call>{% endif %}").name == "hermes"
    assert choose_parser("[TOOL_CALLS] {{ tools }}").name == "mistral"
    assert choose_parser("<|python_tag|>{{ tools }}").name == "llama3_json"
    assert isinstance(choose_parser("{{ messages }}"), GenericParser)
    assert choose_parser(None).name == "generic"
    assert choose_parser("<tool_call>", "mistral").name == "mistral"


def _stream(parser, pieces):
    held = ToolStream(ToolPlan(parser, "auto", []))
    sent = "".join(held.feed(p) for p in pieces)
    rest, calls, parsed = held.finish()
    return sent + rest, calls


def test_stream_holds_back_a_call_split_across_deltas():
    pieces = ["Let me ", "check. <to", "ol_", 'call>\n{"name": "f", ', '"arguments": {"a": 1}}\n</tool_call>']
    content, calls = _stream(HermesParser(), pieces)
    assert content == "Let me check. "
    assert calls[0]["function"] == {"name": "f", "arguments": '{"a": 1}'} and calls[0]["index"] == 0


def test_stream_sends_a_false_alarm_as_content():
    content, calls = _stream(HermesParser(), ["a <to", "ken> b"])
    assert content == "a <token> b" and calls == []
    content, calls = _stream(Llama3JsonParser(), [" {not", " json"])
    assert content == " {not json" and calls == []
