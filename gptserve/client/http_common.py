"""HTTP plumbing shared by the adapters: the API key header, Server-Sent Events, server error messages."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

from gptserve.client.types import ClientError


def auth_headers(api_key: str | None) -> dict[str, str]:
    """`Authorization: Bearer KEY` when a key is set."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def error_message(body: Any) -> str | None:
    """The message of an OpenAI (`{"error": {"message"}}`) or Triton (`{"error": "..."}`) error body."""
    if not isinstance(body, dict) or "error" not in body:
        return None
    error = body["error"]
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


def check_response(response: httpx.Response) -> None:
    """Raise `ClientError` with the server's message unless the response is a success."""
    if response.is_success:
        return
    response.read()
    try:
        message = error_message(response.json())
    except ValueError:
        message = None
    detail = message or response.text.strip() or response.reason_phrase
    raise ClientError(f"HTTP {response.status_code}: {detail}")


def sse_events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """The JSON events of a Server-Sent Events stream, until `data: [DONE]` or its end; an error event
    (sent after a 200 status line) raises `ClientError`."""
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            event = json.loads(data)
        except json.JSONDecodeError:
            raise ClientError(f"the server sent an event that is not JSON: {data[:200]!r}") from None
        message = error_message(event)
        if message is not None:
            raise ClientError(message)
        yield event


def connect_error(url: str, error: Exception) -> ClientError:
    """A readable error for a server that cannot be reached."""
    return ClientError(f"cannot reach the server at {url}: {error}")
