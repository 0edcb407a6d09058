"""Plumbing between engine streams and HTTP: SSE framing, merging the streams of a multi-prompt
request, and cancelling a non-streaming request when its client goes away."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request, Response

from gptserve.outputs import RequestOutput, TokenLogprob
from gptserve.server.errors import APIError, error_body
from gptserve.server.request_stream import RequestStream

T = TypeVar("T")

DONE = "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def sse_error(status: int, message: str, code: str | None = None) -> str:
    return sse(error_body(status, message, None, code))


async def merge_streams(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(position of the stream, output) from all `streams` as outputs arrive."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
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
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


def abort_all(streams: list[RequestStream]) -> None:
    for stream in streams:
        stream.abort()


def raise_if_failed(out: RequestOutput) -> None:
    """An engine-side failure (a request larger than the whole KV cache) is the request's fault."""
    if out.error:
        raise APIError(400, out.error, code="request_too_large")


@dataclass
class ChoiceDelta:
    """What one choice (prompt index * n + sample index) gained in one engine step."""

    index: int
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_tokens: int = 0  # output tokens of the choice so far


async def choice_deltas(streams: list[RequestStream], n: int) -> AsyncIterator[ChoiceDelta]:
    """Per-choice deltas of all `streams`, each choice's last one carrying its finish reason."""
    finished: set[int] = set()
    num_logprobs: dict[int, int] = {}
    try:
        async with contextlib.aclosing(merge_streams(streams)) as merged:
            async for i, out in merged:
                raise_if_failed(out)
                for c in out.outputs:
                    index = i * n + c.index
                    if index in finished:
                        continue
                    new_logprobs: list[TokenLogprob] = []
                    if c.logprobs:
                        new_logprobs = c.logprobs[num_logprobs.get(index, 0) :]
                        num_logprobs[index] = len(c.logprobs)
                    if not (c.delta_text or new_logprobs or c.finished):
                        continue
                    if c.finished:
                        finished.add(index)
                    yield ChoiceDelta(
                        index, c.delta_text, new_logprobs, c.finish_reason, c.stop_reason, len(c.token_ids)
                    )
    finally:
        abort_all(streams)


async def final_outputs(streams: list[RequestStream]) -> list[RequestOutput]:
    """The finished output of every stream, in stream order."""
    finals: dict[int, RequestOutput] = {}
    try:
        async with contextlib.aclosing(merge_streams(streams)) as merged:
            async for i, out in merged:
                if out.finished:
                    raise_if_failed(out)
                    finals[i] = out
    finally:
        abort_all(streams)
    return [finals[i] for i in range(len(streams))]


async def _client_gone(request: Request) -> None:
    # The body has been read, so the next ASGI message can only be the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T | Response:
    """Await `work`, cancelling it if the client disconnects first (it then gets no answer)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task.done():
        return task.result()
    task.cancel()  # its own clean-up aborts the engine requests
    await asyncio.wait({task})
    return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
