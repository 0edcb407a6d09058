"""Tool calling over the OpenAI API with the official SDK, on two real servers: the embedded SmolLM2,
whose chat template knows no tools (the `generic` format: the server describes the tools), and a tiny
GPT-J with a Hermes-style template that renders `tools` and `<tool_call>` itself. Required and named
calls are grammar-constrained, so they always parse and their arguments validate; `auto` is driven
into a call by a regex constraint (a random or small model rarely calls on its own), which exercises
the parser and the streamed hold-back on real output."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tests.server.conftest import start_tiny_gptj_server

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"tz": {"type": "string", "maxLength": 20}},
    "required": ["tz"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER},
    },
    {
        "type": "function",
        "function": {"name": "get_time", "description": "Time in a timezone", "parameters": TIME},
    },
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# drives `auto` into text followed by one call in Hermes's format
FORCED_CALL = (
    r'Let me check\.\n<tool_call>\n\{"name": "get_weather", '
    r'"arguments": \{"city": "Paris", "unit": "celsius"\}\}\n</tool_call>'
)

HERMES_TEMPLATE = """
{%- if tools %}<|system|>You may call: {% for t in tools %}{{ t | tojson }} {% endfor %}
{% endif %}
{%- for m in messages %}
{%- if m.role == 'assistant' and m.tool_calls %}<|assistant|>{% for c in m.tool_calls %}<tool_call>
{{ {"name": c.function.name, "arguments": c.function.arguments} | tojson }}
</tool_call>{% endfor %}
{% elif m.role == 'tool' %}<|tool|><tool_response>{{ m.content }}</tool_response>
{% else %}<|{{ m.role }}|>{{ m.content }}
{% endif %}{% endfor %}<|assistant|>
"""


@pytest.fixture(scope="module")
def hermes_server(tiny_gptj_tokenized, tmp_path_factory):
    proc = start_tiny_gptj_server(
        tiny_gptj_tokenized, tmp_path_factory.mktemp("hermes"), "tiny-hermes", 512, HERMES_TEMPLATE
    )
    yield proc
    assert proc.stop() == 0


@pytest.fixture(params=["smollm2", "hermes"])
def target(request, client, model_name, hermes_server):
    """(client, model, server url) of each server."""
    if request.param == "smollm2":
        return client, model_name, str(client.base_url).removesuffix("/v1/")
    tiny = openai.OpenAI(base_url=f"{hermes_server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    return tiny, "tiny-hermes", hermes_server.url


def _check_calls(tool_calls, allowed=("get_weather", "get_time")) -> None:
    assert tool_calls
    for call in tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def _streamed(stream):
    """(content, tool calls as dicts, finish reason) of a streamed choice 0."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        for c in chunk.choices:
            content += c.delta.content or ""
            for call in c.delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"id": call.id, "name": "", "arguments": ""})
                entry["name"] += call.function.name or ""
                entry["arguments"] += call.function.arguments or ""
            finish = c.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def _required(client, model, parallel):
    response = client.chat.completions.create(
        model=model, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=parallel,
        max_tokens=200, temperature=0.8, seed=3,
    )  # fmt: skip
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    _check_calls(choice.message.tool_calls)
    return choice.message.tool_calls


def test_required_one_call(target):
    client, model, _ = target
    assert len(_required(client, model, parallel=False)) == 1


def test_required_parallel(client, model_name):
    """Several calls may follow each other (a random model would never stop calling: SmolLM2 does)."""
    assert _required(client, model_name, parallel=True)


def test_named_streamed_and_not(target):
    client, model, _ = target
    named = {"type": "function", "function": {"name": "get_time"}}
    args = dict(
        model=model, messages=ASK, tools=TOOLS, tool_choice=named, max_tokens=200, temperature=0.7, seed=5
    )
    whole = client.chat.completions.create(**args).choices[0]
    assert whole.finish_reason == "stop"  # OpenAI ends a named call with "stop"
    _check_calls(whole.message.tool_calls, allowed=("get_time",))
    content, calls, finish = _streamed(client.chat.completions.create(**args, stream=True))
    assert content == "" and finish == "stop" and len(calls) == 1
    assert calls[0]["name"] == "get_time"
    assert calls[0]["arguments"] == whole.message.tool_calls[0].function.arguments  # same seed, same call


def test_auto_reads_the_call_out_of_the_text(target):
    client, model, _ = target
    args = dict(
        model=model, messages=ASK, tools=TOOLS, max_tokens=120, extra_body={"guided_regex": FORCED_CALL}
    )
    whole = client.chat.completions.create(**args).choices[0]
    assert whole.finish_reason == "tool_calls"
    assert whole.message.content == "Let me check."
    _check_calls(whole.message.tool_calls)
    assert json.loads(whole.message.tool_calls[0].function.arguments) == {"city": "Paris", "unit": "celsius"}
    content, calls, finish = _streamed(client.chat.completions.create(**args, stream=True))
    assert content.strip() == "Let me check." and "<tool" not in content
    assert finish == "tool_calls" and [c["name"] for c in calls] == ["get_weather"]


def test_auto_without_a_call_is_plain_text(target):
    client, model, _ = target
    response = client.chat.completions.create(
        model=model, messages=ASK, tools=TOOLS, max_tokens=8, extra_body={"guided_regex": "It is sunny\\."}
    )
    choice = response.choices[0]
    assert choice.message.content == "It is sunny." and not choice.message.tool_calls
    assert choice.finish_reason == "stop"


def test_follow_up_turn_renders_the_call_and_its_result(target):
    client, model, url = target
    first = client.chat.completions.create(
        model=model,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=200,
    )
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"},
    ]
    answer = client.chat.completions.create(model=model, messages=history, tools=TOOLS, max_tokens=10)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    rendered = httpx.post(
        f"{url}/tokenize",
        json={"model": model, "messages": history, "tools": TOOLS, "return_token_strs": True},
    ).json()
    prompt = httpx.post(f"{url}/detokenize", json={"model": model, "tokens": rendered["tokens"]}).json()[
        "prompt"
    ]
    assert "<tool_response>" in prompt and "18 degrees and sunny" in prompt
    assert "<tool_call>" in prompt and call.function.name in prompt
    assert "get_time" in prompt  # the tool list reached the model
    arguments = json.loads(call.function.arguments)
    assert json.dumps(arguments, ensure_ascii=False)[1:-1] in prompt  # the arguments rendered as an object


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "nope",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/missing"}}}]},
            "tools[0].function.parameters",
            "missing",
        ),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
            "cannot be combined",
        ),
        ({"tools": TOOLS + TOOLS[:1]}, "tools", "more than once"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type", "function"),
    ],
)
def test_tool_errors_are_400s(client, model_name, extra, param, words):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_name, messages=ASK, max_tokens=4, extra_body=extra)
    error = info.value.body
    assert error["param"] == param and words in error["message"], error
