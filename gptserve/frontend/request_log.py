"""Structured request logs: one `key=value` line per finished request on the `gptserve.requests` logger
at INFO (so `--log-level warning` silences them).

A line carries the request id (the client's `X-Request-Id`, else a fresh one, echoed in the response),
the route, the status, prompt and output tokens, time to first token and total time:

    request_id=5f0c... route="POST /v1/completions" status=200 prompt_tokens=4 output_tokens=16
    ttft_s=0.012 total_s=0.094

`RequestLogMiddleware` opens a `RequestRecord` for each HTTP request and logs it once the last byte of
the response is sent (for a stream, after `[DONE]`). The record rides in a context variable, so the
engine streams the request creates find it (`current_record`) and count their tokens into it.
The gRPC service uses `log_call` around its calls the same way.
"""

from __future__ import annotations

import contextvars
import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("gptserve.requests")

# Polled, not served: logging every probe would bury the requests.
UNLOGGED_PATHS = ("/health", "/metrics", "/v2/health/")


@dataclass
class RequestRecord:
    """What one request did, filled in as it runs."""

    request_id: str
    route: str
    start: float = field(default_factory=time.monotonic)
    status: int | str | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    first_token: float | None = None

    def add_output(self, num_tokens: int, now: float) -> None:
        if num_tokens and self.first_token is None:
            self.first_token = now
        self.output_tokens += num_tokens

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        ttft = "-" if self.first_token is None else f"{self.first_token - self.start:.4f}"
        status = "-" if self.status is None else self.status  # "-": the client left before any answer
        return (
            f'request_id={self.request_id} route="{self.route}" status={status} '
            f"prompt_tokens={self.prompt_tokens} output_tokens={self.output_tokens} "
            f"ttft_s={ttft} total_s={now - self.start:.4f}"
        )


_current: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar(
    "gptserve_request_record", default=None
)


def current_record() -> RequestRecord | None:
    """The record of the request being served in this context, if any."""
    return _current.get()


@contextmanager
def log_call(route: str, request_id: str | None = None) -> Iterator[RequestRecord]:
    """Open a record for the code inside and log it when that code ends; set `record.status` inside.
    A client's `request_id` is kept to its safe characters, so it cannot forge log lines."""
    given = "".join(c for c in (request_id or "")[:128] if c.isascii() and (c.isalnum() or c in "._-"))
    record = RequestRecord(given or uuid.uuid4().hex, route)
    token = _current.set(record)
    try:
        yield record
    finally:
        _current.reset(token)
        logger.info(record.line())


class RequestLogMiddleware:
    """ASGI middleware: a `RequestRecord` per HTTP request, logged after the response's last byte."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path.startswith(UNLOGGED_PATHS):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        client_id = headers.get(b"x-request-id", b"").decode("latin-1")
        route = f"{scope.get('method', '')} {path}"
        with log_call(route, client_id) as record:

            async def send_and_record(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    record.status = message["status"]
                    message = {
                        **message,
                        "headers": [*message.get("headers", []),
                                    (b"x-request-id", record.request_id.encode("latin-1"))],
                    }  # fmt: skip
                await send(message)

            await self.app(scope, receive, send_and_record)
