"""The structured-output constraint of an OpenAI request, from whichever field the client used.

OpenAI's `response_format` (`json_object`, `json_schema`), vLLM's `structured_outputs` object and its
older `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` fields all become one
`StructuredOutputs`. A request may use one of them; two are a 400 naming the second. The constraint is
compiled (and checked: an invalid schema, regex or grammar is a 400 naming the field) off the event
loop before the request is admitted.
"""

from __future__ import annotations

import asyncio

from gptserve.errors import GptServeError, InvalidRequestError
from gptserve.sampling_params import SamplingParams, StructuredOutputs
from gptserve.server.errors import bad_request, to_api_error
from gptserve.server.openai_protocol import StructuredFields
from gptserve.server.serving import OpenAIServing


def _from_response_format(req: StructuredFields) -> StructuredOutputs | None:
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredOutputs(json_object=True, param="response_format")
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise bad_request(
            'response_format of type "json_schema" needs json_schema.schema', "response_format.json_schema"
        )
    return StructuredOutputs(json=fmt.json_schema.schema_, param="response_format.json_schema.schema")


def _from_structured_outputs(req: StructuredFields) -> StructuredOutputs | None:
    so = req.structured_outputs
    if so is None:
        return None
    whitespace = "" if so.disable_any_whitespace else so.whitespace_pattern
    return StructuredOutputs(
        json=so.json_,
        json_object=bool(so.json_object),
        regex=so.regex,
        choice=None if so.choice is None else tuple(so.choice),
        grammar=so.grammar,
        whitespace_pattern=whitespace,
        param="structured_outputs",
    )


def _from_guided(req: StructuredFields) -> StructuredOutputs | None:
    fields = {
        "guided_json": req.guided_json,
        "guided_regex": req.guided_regex,
        "guided_choice": req.guided_choice,
        "guided_grammar": req.guided_grammar,
    }
    given = [name for name, value in fields.items() if value is not None]
    if not given:
        return None
    if len(given) > 1:
        raise bad_request(f"{given[1]} cannot be combined with {given[0]}", given[1])
    name = given[0]
    return StructuredOutputs(
        json=req.guided_json,
        regex=req.guided_regex,
        choice=None if req.guided_choice is None else tuple(req.guided_choice),
        grammar=req.guided_grammar,
        whitespace_pattern=req.guided_whitespace_pattern,
        param=name,
    )


def structured_outputs(req: StructuredFields) -> StructuredOutputs | None:
    """The one constraint the request asks for, or None; a 400 for a malformed or doubled one."""
    found: list[StructuredOutputs] = []
    try:
        for build in (_from_response_format, _from_structured_outputs, _from_guided):
            spec = build(req)
            if spec is not None:
                found.append(spec)
    except InvalidRequestError as e:
        raise to_api_error(e) from None
    if len(found) > 1:
        raise bad_request(
            f"{found[1].param} cannot be combined with {found[0].param}: a request takes one constraint",
            found[1].param,
        )
    return found[0] if found else None


async def compile_constraint(serving: OpenAIServing, params: SamplingParams) -> None:
    """Compile `params`' constraint in a worker thread (the input processor then finds it cached)."""
    if params.structured_outputs is None:
        return
    try:
        await asyncio.to_thread(serving.inputs.compile_grammar, params)
    except GptServeError as e:
        raise to_api_error(e) from None
