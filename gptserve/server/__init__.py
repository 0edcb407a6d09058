"""The HTTP server: an asyncio front-end (FastAPI) over the engine core running on its own thread.

`build_app(engine, ServerConfig(...))` assembles the app; `gptserve serve` runs it under uvicorn.
"""

from gptserve.server.app import ServerConfig, build_app
from gptserve.server.async_engine import AsyncEngine, EngineDeadError

__all__ = ["AsyncEngine", "EngineDeadError", "ServerConfig", "build_app"]
