"""`DrainingServer`: uvicorn's server, where a drain on SIGINT/SIGTERM is a normal stop.

uvicorn stops accepting connections on the first SIGINT/SIGTERM, waits for in-flight requests and then
re-raises the signal, which ends the process with the signal's status. A server asked to stop that
drained cleanly has done its job, so here the signal is not re-raised and the process exits 0. A second
SIGINT still forces the exit.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

import uvicorn


class DrainingServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
