"""The HTTP server: an asyncio front-end (FastAPI) over the engine core running on its own thread.

`build_app(engine, ServerConfig(...))` assembles the app; `gptserve serve` runs it under uvicorn. The
names below are imported on first use, so the front-ends the app mounts (`gptserve.triton`) can use the
server's modules without importing the app first.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ServerConfig": "gptserve.server.app",
    "build_app": "gptserve.server.app",
    "AsyncEngine": "gptserve.server.async_engine",
    "EngineDeadError": "gptserve.server.async_engine",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gptserve.server' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
