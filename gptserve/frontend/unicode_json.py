"""JSON request bodies must hold Unicode text: `UnicodeJSONRoute` refuses unpaired UTF-16 surrogates.

A JSON string escape can spell a lone surrogate (`"\\ud800"`), and Python's `json` decodes it into a
`str` that is not Unicode text: the tokenizer raises `TypeError` on it, and an error body quoting it (an
unknown model name, a misspelt field) cannot be encoded as UTF-8. Such bodies are refused as JSON that is
not valid, the I-JSON rule (RFC 7493): a 400 that names the surrogate, before any handler runs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

_SURROGATE = re.compile("[\ud800-\udfff]")


def find_surrogate(value: Any) -> str | None:
    """The first lone surrogate in any string (key or value) of a decoded JSON document, or None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii() and (match := _SURROGATE.search(item)):
                return match.group()
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


class UnicodeJSONRequest(Request):
    async def json(self) -> Any:
        try:
            body = await super().json()
        except UnicodeDecodeError as e:  # FastAPI would answer a vague "error parsing the body"
            raise json.JSONDecodeError(f"the body is not UTF-8 text ({e.reason})", "", 0) from None
        surrogate = find_surrogate(body)
        if surrogate is not None:
            # FastAPI turns a JSONDecodeError into its "json_invalid" validation error, a 400 here.
            raise json.JSONDecodeError(
                f"a string holds the unpaired UTF-16 surrogate \\u{ord(surrogate):04x}, which is not a "
                "Unicode character",
                "",
                0,
            )
        return body


class UnicodeJSONRoute(APIRoute):
    """A route whose JSON body (as FastAPI parses it, and as `Request.json()` gives it to the handler)
    holds Unicode text only."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def unicode_handler(request: Request) -> Response:
            return await handler(UnicodeJSONRequest(request.scope, request.receive))

        return unicode_handler
