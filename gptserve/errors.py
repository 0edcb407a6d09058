"""Exceptions with messages meant for users: each names the file, field or number at fault."""


class GptServeError(Exception):
    """Base class of every error gptserve raises on purpose."""


class ModelLoadError(GptServeError):
    """A checkpoint could not be read: unknown architecture, missing or corrupt files, shape mismatch."""


class InvalidRequestError(GptServeError, ValueError):
    """A request or sampling parameter is out of range or of the wrong type."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class QueueFullError(GptServeError):
    """The server's queue of waiting requests is full (`--max-queue-len`); the client should retry later."""


class RequestTimeoutError(GptServeError):
    """A request ran longer than `--request-timeout`; it was aborted and its KV blocks freed."""
