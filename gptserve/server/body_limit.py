"""`BodySizeLimit`: an ASGI middleware that refuses request bodies over `--max-request-bytes` with a 413.

A declared `Content-Length` over the limit is answered before the route runs, in the error form of the
route (Triton's `{"error": ...}` under `/v2`, OpenAI's elsewhere). A body without a length (chunked) is
counted as it is read; the read that crosses the limit raises an `HTTPException(413)` inside the route,
whose error handlers give it the route's form.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import HTTPException

from gptserve.server.errors import error_body

Scope = dict[str, Any]
Message = dict[str, Any]


def too_large_message(limit: int) -> str:
    return f"request body exceeds the limit of {limit} bytes (--max-request-bytes)"


class BodySizeLimit:
    """Wraps an ASGI app; `max_bytes` is the largest accepted request body."""

    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, too_large_message(self.max_bytes))
            return message

        await self.app(scope, limited_receive, send)

    async def _refuse(self, scope: Scope, send: Any) -> None:
        message = too_large_message(self.max_bytes)
        if scope.get("path", "").startswith("/v2"):
            body = {"error": message}
        else:
            body = error_body(413, message, None, "request_too_large")
        payload = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                   (b"connection", b"close")]  # fmt: skip
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
