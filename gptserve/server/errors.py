"""HTTP errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the right status.

Every way a request can be bad ends here as a 4xx: our own `APIError`, gptserve's errors (each carries
its status; `InvalidRequestError` names the field at fault), pydantic validation errors (FastAPI's 422,
turned into a 400 naming the parameter) and routing errors. A 500 means a bug in the server, never bad
input.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptserve.errors import GptServeError, InvalidRequestError, QueueFullError, RequestTimeoutError
from gptserve.frontend.api_error import APIError

logger = logging.getLogger(__name__)

# The error `type` OpenAI uses for each status.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(err: APIError) -> JSONResponse:
    body = error_body(err.status, err.message, err.param, err.code)
    return JSONResponse(body, status_code=err.status, headers=err.headers)


def to_api_error(err: GptServeError, renames: dict[str, str] | None = None) -> APIError:
    """A gptserve error in OpenAI's form, with the status it carries; `renames` maps engine field names
    to the API's (chat's `max_completion_tokens`, `top_logprobs`)."""
    if isinstance(err, InvalidRequestError):
        param = err.param
        message = str(err)
        if param and renames and param in renames:
            message = message.replace(param, renames[param], 1)
            param = renames[param]
        return APIError(err.http_status, message, param, err.code)
    if isinstance(err, QueueFullError):  # as for every overloaded route
        return APIError(err.http_status, str(err), code="queue_full", headers={"Retry-After": "1"})
    if isinstance(err, RequestTimeoutError):
        return APIError(err.http_status, str(err), code="request_timeout")
    return APIError(err.http_status, str(err))


_TYPE_TAGS = ("str", "int", "float", "bool", "list", "dict", "none")


def _split_loc(loc: tuple[Any, ...]) -> tuple[str | None, str | None]:
    """('body', 'messages', 0, 'content') -> ('messages[0].content', None); a union member tag that
    pydantic adds to the path ('prompt', 'list[int]', 3) ends the field path and is returned apart."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or part in _TYPE_TAGS:
            return out or None, part
        else:
            out += f".{part}" if out else part
    return out or None, None


def validation_error_to_api_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request")
    first = errors[0]
    kind = first.get("type", "")
    if kind == "json_invalid":
        return bad_request(f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip())
    param, _ = _split_loc(tuple(first.get("loc", ())))
    if param is None:
        return bad_request("request body is missing or is not a JSON object")
    if kind == "extra_forbidden":
        return bad_request(f"unrecognized request argument: {param}", param)
    if kind == "missing":
        return bad_request(f"{param} is required", param)
    tags = [tag for e in errors for p, tag in [_split_loc(tuple(e.get("loc", ())))] if p == param and tag]
    if len(tags) > 1:  # every member of a union failed: say what would have been accepted
        accepted = ", ".join(dict.fromkeys(tags))
        return bad_request(f"{param} has the wrong type: expected one of {accepted}", param)
    return bad_request(f"{param}: {first.get('msg', 'invalid value')}", param)


def install_error_handlers(app: FastAPI) -> None:
    """Route every error of the app through OpenAI's error body."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(GptServeError)
    async def _gptserve(request: Request, exc: GptServeError) -> JSONResponse:
        return error_response(to_api_error(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error_to_api_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        return error_response(APIError(exc.status_code, message, headers=getattr(exc, "headers", None)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"internal server error: {type(exc).__name__}"))
