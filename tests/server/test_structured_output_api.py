"""Structured output over the OpenAI API, through the official SDK against the real server on SmolLM2:
`parse()` with a pydantic model, `response_format` json_schema / json_object, vLLM's `guided_*` fields and
`structured_outputs`, streamed or not, with `n > 1` and seeds; invalid constraints are 400s naming the
field."""

from __future__ import annotations

import json
import re
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 30},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        "genre": {"enum": ["drama", "comedy", "horror"]},
        "director": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 30}, "alive": {"type": "boolean"}},
            "required": ["name", "alive"],
            "additionalProperties": False,
        },
        "cast": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 1, "maxItems": 3},
    },
    "required": ["title", "year", "genre", "director", "cast"],
    "additionalProperties": False,
}


class Address(BaseModel):
    city: str = Field(max_length=30)
    country: str = Field(max_length=30)


class Person(BaseModel):
    name: str = Field(max_length=30)
    age: int
    kind: Literal["student", "teacher", "other"]
    address: Address


def _messages(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize(
    "prompt", ["Describe Marie Curie.", "Invent a student from Lyon.", "Who is the teacher?"]
)
def test_parse_with_a_pydantic_model(client, model_name, prompt):
    response = client.chat.completions.parse(
        model=model_name, messages=_messages(prompt), response_format=Person, temperature=0.8, max_tokens=120
    )
    choice = response.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(choice.message.parsed, Person)
    else:
        assert choice.finish_reason == "length"


def test_json_schema_streamed_with_n_and_seed(client, model_name):
    fmt = {"type": "json_schema", "json_schema": {"name": "movie", "schema": SCHEMA, "strict": True}}
    texts: dict[int, str] = {0: "", 1: ""}
    finish: dict[int, str] = {}
    stream = client.chat.completions.create(
        model=model_name, messages=_messages("A movie as JSON."), response_format=fmt, n=2, seed=11,
        temperature=0.9, max_tokens=150, stream=True,
    )  # fmt: skip
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    again = client.chat.completions.create(
        model=model_name, messages=_messages("A movie as JSON."), response_format=fmt, n=2, seed=11,
        temperature=0.9, max_tokens=150,
    )  # fmt: skip
    for c in again.choices:
        assert c.message.content == texts[c.index]  # the seed gives the same samples, streamed or not
        assert c.finish_reason == finish[c.index]
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.message.content), SCHEMA)


def test_json_object(client, model_name):
    response = client.chat.completions.create(
        model=model_name,
        messages=_messages("Give me any JSON object."),
        response_format={"type": "json_object"},
        max_tokens=100,
        temperature=0,
    )
    choice = response.choices[0]
    assert choice.message.content.startswith("{")
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)


def test_guided_fields_on_completions(client, model_name):
    regex = client.completions.create(
        model=model_name, prompt="Call me at", max_tokens=20, n=3, temperature=1.0, seed=1,
        extra_body={"guided_regex": r"\(\d{3}\) \d{3}-\d{4}"},
    )  # fmt: skip
    for c in regex.choices:
        assert c.finish_reason == "stop" and re.fullmatch(r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}", c.text), c.text
    choice = client.completions.create(
        model=model_name, prompt="The sky is", max_tokens=5, extra_body={"guided_choice": ["blue", "green"]}
    )
    assert choice.choices[0].text in ("blue", "green")
    grammar = client.completions.create(
        model=model_name, prompt="Answer:", max_tokens=10, temperature=1.0,
        extra_body={"guided_grammar": 'root ::= ("yes" | "no") ", " [0-9]'},
    )  # fmt: skip
    assert re.fullmatch(r"(yes|no), [0-9]", grammar.choices[0].text)
    guided_json = client.completions.create(
        model=model_name, prompt="A movie:", max_tokens=150, extra_body={"guided_json": SCHEMA}
    )
    if guided_json.choices[0].finish_reason == "stop":
        jsonschema.validate(json.loads(guided_json.choices[0].text), SCHEMA)


def test_structured_outputs_field_on_chat(client, model_name):
    response = client.chat.completions.create(
        model=model_name, messages=_messages("Pick a colour."), max_tokens=5,
        extra_body={"structured_outputs": {"choice": ["red", "blue"]}},
    )  # fmt: skip
    assert response.choices[0].message.content in ("red", "blue")
    compact = client.chat.completions.create(
        model=model_name, messages=_messages("A movie as JSON."), max_tokens=150, temperature=0,
        extra_body={"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}},
    )  # fmt: skip
    content = compact.choices[0].message.content
    if compact.choices[0].finish_reason == "stop":
        assert json.dumps(json.loads(content), separators=(",", ":"), ensure_ascii=False) == content


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"$ref": "#/nope"}},
                }
            },
            "response_format.json_schema.schema",
            "nope",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema",
            "schema",
        ),
        ({"guided_regex": "a(b"}, "guided_regex", "unclosed group"),
        ({"guided_grammar": "root ::= ("}, "guided_grammar", "grammar"),
        ({"guided_json": {"type": "object"}, "guided_choice": ["a"]}, "guided_choice", "cannot be combined"),
        (
            {"response_format": {"type": "json_object"}, "guided_regex": "a"},
            "guided_regex",
            "cannot be combined",
        ),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
        ({"guided_choice": []}, "guided_choice", "non-empty"),
        ({"response_format": {"type": "xml"}}, "response_format.type", ""),
    ],
)
def test_invalid_constraints_are_400s(client, model_name, extra, param, words):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=model_name, messages=_messages("hi"), max_tokens=5, extra_body=extra
        )
    error = info.value.body
    assert error["param"] == param
    assert words in error["message"]
    # and the server keeps serving
    ok = client.chat.completions.create(model=model_name, messages=_messages("hi"), max_tokens=2)
    assert ok.choices[0].finish_reason in ("stop", "length")
