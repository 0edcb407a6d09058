"""The server run inside this process on a free loopback port, so that `gptserve chat MODEL` talks to a
local model through the same OpenAI routes as to a remote one (and Ctrl-C closing the stream aborts
the request there, exactly as for a remote server)."""

from __future__ import annotations

import socket
import threading
import time

from gptserve.engine.engine_options import EngineOptions
from gptserve.errors import GptServeError

STARTUP_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """A context manager: loads `model` and serves it until the block ends; `url` is its address."""

    def __init__(self, model: str | None, options: EngineOptions, chat_template: str | None = None):
        self.model = model
        self.options = options
        self.chat_template = chat_template
        self.url = ""
        self._server = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> LocalServer:
        import uvicorn

        from gptserve.app import ServerConfig, build_app
        from gptserve.engine.builder import build_engine

        engine = build_engine(self.model, self.options)
        app = build_app(engine, ServerConfig(chat_template=self.chat_template, model_path=self.model))
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
        self._server = server = uvicorn.Server(config)
        self._thread = threading.Thread(target=server.run, name="gptserve-chat-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise GptServeError("the local server did not start (see the log above)")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
