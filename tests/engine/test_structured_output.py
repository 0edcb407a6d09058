"""Structured output in the engine, on the embedded SmolLM2: every constrained output that ends with
"stop" parses and validates, `n > 1` samples each follow their own grammar state, a constrained row in a
mixed batch gets what it gets alone, preemption under a tiny KV cache keeps outputs valid, and invalid
constraints are errors that name the field."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from gptserve import LLM, SamplingParams
from gptserve.engine.grammar import ascii_digits
from gptserve.errors import InvalidRequestError
from gptserve.sampling_params import StructuredOutputs

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "address", "tags"],
    "additionalProperties": False,
}
PROMPTS = ["Describe a user of a web shop as JSON.", "JSON for a person:", "Here is a record:"]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(dtype="fp32", device="cpu", max_model_len=1024)


def test_json_schema_outputs_validate(llm):
    params = SamplingParams(
        n=2, max_tokens=160, temperature=0.9, seed=7, structured_outputs=StructuredOutputs(json=PERSON)
    )
    stopped = 0
    for result in llm.generate(PROMPTS, params):
        assert len(result.outputs) == 2
        for out in result.outputs:
            if out.finish_reason == "stop":
                jsonschema.validate(json.loads(out.text), PERSON)
                stopped += 1
    assert stopped >= 4  # most samples finish within the budget


def test_regex_choice_and_grammar(llm):
    regex = SamplingParams(
        max_tokens=20, temperature=1.0, seed=1, structured_outputs=StructuredOutputs(regex=r"\d{3}-\d{4}")
    )
    choice = SamplingParams(
        max_tokens=10,
        temperature=1.0,
        seed=2,
        structured_outputs=StructuredOutputs(choice=["red", "green", "blue"]),
    )
    gbnf = 'root ::= "answer: " ("yes" | "no") "!"'
    grammar = SamplingParams(
        max_tokens=10, temperature=1.0, seed=3, structured_outputs=StructuredOutputs(grammar=gbnf)
    )
    for params, pattern in (
        (regex, r"[0-9]{3}-[0-9]{4}"),
        (choice, "red|green|blue"),
        (grammar, r"answer: (yes|no)!"),
    ):
        for result in llm.generate(PROMPTS, params):
            out = result.outputs[0]
            assert out.finish_reason == "stop"
            assert re.fullmatch(pattern, out.text), out.text


def test_constrained_rows_do_not_depend_on_their_batch(llm):
    """Each constrained request of a mixed batch of 16 gets the tokens it gets alone (seeded sampling)."""

    def constrained(i: int) -> SamplingParams:
        spec = StructuredOutputs(json=PERSON) if i % 2 else StructuredOutputs(regex=r"[a-z]+ [0-9]{2,4}")
        return SamplingParams(max_tokens=48, temperature=0.8, seed=100 + i, structured_outputs=spec)

    prompts = [f"Item {i}: write something." for i in range(16)]
    params = [
        constrained(i) if i % 4 != 3 else SamplingParams(max_tokens=48, temperature=0.8, seed=i)
        for i in range(16)
    ]
    together = llm.generate(prompts, params)
    for i in (0, 1, 5, 6):
        alone = llm.generate([prompts[i]], params[i])[0]
        assert alone.outputs[0].token_ids == together[i].outputs[0].token_ids


def test_preemption_keeps_constrained_output_valid():
    llm = LLM(
        dtype="fp32", device="cpu", max_model_len=256, kv_cache_memory="12MiB", enable_prefix_caching=False
    )
    params = SamplingParams(
        max_tokens=120, temperature=0.9, seed=5, n=2, structured_outputs=StructuredOutputs(json=PERSON)
    )
    results = llm.generate([f"Person {i} as JSON:" for i in range(6)], params)
    assert llm.engine.core.scheduler.num_preemptions > 0
    for result in results:
        for out in result.outputs:
            if out.finish_reason == "stop":
                jsonschema.validate(json.loads(out.text), PERSON)


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        (dict(json={"type": "object", "properties": {"a": {"$ref": "#/missing"}}}), "missing"),
        (dict(regex="a(b"), "unclosed group"),
        (dict(grammar="root ::= ("), "grammar"),
        (dict(json="{not json"), "not valid JSON"),
        (dict(choice=[]), "non-empty"),
        (dict(regex="a", choice=["a"]), "exactly one"),
    ],
)
def test_invalid_constraints_name_the_field(llm, spec, words):
    with pytest.raises(InvalidRequestError, match=words) as info:
        params = SamplingParams(structured_outputs=StructuredOutputs(**spec, param="guided_x"))
        llm.generate(["hi"], params)
    assert info.value.param == "guided_x"


def test_beam_search_refuses_a_constraint():
    with pytest.raises(InvalidRequestError, match="beam search"):
        SamplingParams(beam_width=2, structured_outputs=StructuredOutputs(choice=["a"]))


def test_ascii_digits():
    assert ascii_digits(r"\d+") == "[0-9]+"
    assert ascii_digits(r"[\d,]\\d\.") == r"[0-9,]\\d\."
    assert re.fullmatch(ascii_digits(r"\d{2}"), "42")
