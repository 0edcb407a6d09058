"""Exceptions with messages meant for users: each names the file, field or number at fault.

Every error a request can meet carries the HTTP status it is answered with (`http_status`); the OpenAI
routes, Triton's HTTP routes and its gRPC service (which maps HTTP statuses to gRPC codes) all read it,
so one class means one answer on every protocol.
"""


class GptServeError(Exception):
    """Base class of every error gptserve raises on purpose."""

    http_status = 500


class ModelLoadError(GptServeError):
    """A checkpoint could not be read: unknown architecture, missing or corrupt files, shape mismatch."""


class InvalidRequestError(GptServeError, ValueError):
    """A request or sampling parameter is out of range or of the wrong type."""

    http_status = 400

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class QueueFullError(GptServeError):
    """The server's queue of waiting requests is full (`--max-queue-len`); the client should retry later."""

    http_status = 503


class RequestTimeoutError(GptServeError):
    """A request ran longer than `--request-timeout`; it was aborted and its KV blocks freed."""

    http_status = 408


class EngineDeadError(GptServeError):
    """The engine thread stopped (crashed or shut down); no request can be served any more."""

    http_status = 503
