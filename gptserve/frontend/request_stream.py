"""`RequestStream`: the outputs of one engine request as the event loop receives them, and the ways
front-ends read several at once (`merge_streams`) or give them up (`abort_all`).

The output processor hands over one output per step; a consumer that fell behind gets the backlog folded
into one output (text and token deltas joined), so a slow client costs one message, not many.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence

from gptserve.frontend.request_log import RequestRecord, current_record
from gptserve.outputs import RequestOutput


def _merge(older: RequestOutput, newer: RequestOutput) -> RequestOutput:
    """Fold two consecutive outputs of one request into one (the consumer fell a step behind)."""
    previous = {c.index: c for c in older.outputs}
    for c in newer.outputs:
        p = previous.get(c.index)
        if p is not None:
            c.delta_text = p.delta_text + c.delta_text
            c.delta_token_ids = p.delta_token_ids + c.delta_token_ids
    return newer


class RequestStream:
    """The outputs of one admitted request, in order; iterate it with `async for`."""

    def __init__(self, request_id: str, num_prompt_tokens: int, on_abort: Callable[[str], None]):
        self.request_id = request_id
        self.num_prompt_tokens = num_prompt_tokens
        self._on_abort = on_abort
        self._items: deque[RequestOutput | BaseException] = deque()
        self._ready = asyncio.Event()
        self._done = False
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.log_record: RequestRecord | None = current_record()  # the HTTP/gRPC request it serves

    @property
    def finished(self) -> bool:
        return self._done

    def put(self, item: RequestOutput | BaseException) -> None:
        self._items.append(item)
        self._ready.set()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        while not self._items:
            if self._done:  # aborted while waiting
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        while isinstance(item, RequestOutput) and self._items and isinstance(self._items[0], RequestOutput):
            item = _merge(item, self._items.popleft())  # type: ignore[arg-type]
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finished:
            self._done = True
        return item

    def abort(self) -> None:
        """Stop the request unless it already finished; its blocks are freed by the next engine iteration."""
        if not self._done:
            self._done = True
            self._ready.set()
            self._on_abort(self.request_id)


async def merge_batches(
    streams: Sequence[RequestStream],
) -> AsyncIterator[list[tuple[int, RequestOutput | None]]]:
    """What all `streams` delivered since the last batch, as (position of the stream, output) pairs, with
    None for a stream that ended; a stream's failure is raised here. Outputs of one engine step arrive
    in one batch."""
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out))
        except Exception as e:
            queue.put_nowait((i, e))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            items = [await queue.get()]
            while not queue.empty():
                items.append(queue.get_nowait())
            batch: list[tuple[int, RequestOutput | None]] = []
            for i, item in items:
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    remaining -= 1
                batch.append((i, item))
            yield batch
    finally:
        for task in tasks:
            task.cancel()


async def merge_streams(streams: Sequence[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(position of the stream, output) from all `streams` as outputs arrive; a stream's failure is
    raised here."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    batches = merge_batches(streams)
    try:
        async for batch in batches:
            for i, out in batch:
                if out is not None:
                    yield i, out
    finally:
        await batches.aclose()


def abort_all(streams: Sequence[RequestStream]) -> None:
    for stream in streams:
        stream.abort()
