"""`APIError`: an error answered to an HTTP client as it is, with its status (and headers), by whichever
front-end's route raised it: OpenAI's error body on the OpenAI routes, Triton's on the KServe routes."""

from __future__ import annotations


class APIError(Exception):
    """An error answered to the client as-is."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers
