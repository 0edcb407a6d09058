"""The OpenAPI document served at `/openapi.json`: the OpenAI-compatible routes, vLLM's `/tokenize`,
`/detokenize` and `/tokenizer_info`, `/health` and `/metrics`, with the request bodies of
`openai_protocol.py`.

FastAPI describes a route's body only when the route declares it; a route that parses its body itself
(to pick between request shapes) names its models with `openapi_extra=json_body(...)` and the document
describes them all the same. FastAPI also documents a 422 with its own validation body wherever a route
takes input; this server answers every bad request with a 4xx and OpenAI's error body (`errors.py`), so
the document says that instead. Routes left out with `include_in_schema=False` (the Triton KServe v2
routes, which have their own protocol description, and the chat page) are not in it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

REF = "#/components/schemas/"
ERROR_SCHEMA = "ErrorResponse"
_DEFS_KEY = "x-gptserve-body-defs"  # carries a `json_body`'s model definitions to `_finish`
# `responses=` of a route that may answer 503: the queue is full or the engine has stopped.
UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {"description": "The queue is full (with Retry-After) or the engine has stopped"}
}
# `responses=` of a route that names a model in its path.
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "This server does not serve that model"}}

_ERROR_BODY = {
    "type": "object",
    "title": ERROR_SCHEMA,
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def json_body(*models: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` of a route that reads its JSON body itself: the body is one of `models` (the route
    still does the validation; this only describes it)."""
    refs, defs = models_json_schema([(m, "validation") for m in models], ref_template=REF + "{model}")
    choices = [refs[(m, "validation")] for m in models]
    schema = choices[0] if len(choices) == 1 else {"oneOf": choices}
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
        _DEFS_KEY: defs.get("$defs", {}),
    }


def _finish(document: dict[str, Any]) -> dict[str, Any]:
    """Moves `json_body` models into the components; 422 (FastAPI's validation body) becomes 4XX on every
    route that takes input, and every error response gets OpenAI's body. Idempotent."""
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas[ERROR_SCHEMA] = _ERROR_BODY
    error_content = {"application/json": {"schema": {"$ref": REF + ERROR_SCHEMA}}}
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            for name, schema in operation.pop(_DEFS_KEY, {}).items():
                schemas.setdefault(name, schema)
            responses = operation.setdefault("responses", {})
            if responses.pop("422", None) is not None or "requestBody" in operation:
                responses["4XX"] = {"description": "A bad request (the message names the field), an unknown "
                                    "model or a body over the size limit"}  # fmt: skip
            for status, response in responses.items():
                if status[0] in "45":
                    response["content"] = error_content
    return document


def install_openapi(app: FastAPI) -> None:
    """Makes `app.openapi()` (FastAPI's document of the routes in the schema) the document described
    above."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        return _finish(generate())

    app.openapi = openapi  # type: ignore[method-assign]
