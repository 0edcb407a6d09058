"""Plumbing between engine streams and OpenAI's HTTP answers: SSE framing, per-choice deltas of a
multi-prompt request, and the final outputs of a non-streaming one."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from gptserve.frontend.api_error import APIError
from gptserve.frontend.request_stream import RequestStream, abort_all, merge_streams
from gptserve.outputs import RequestOutput, TokenLogprob
from gptserve.server.errors import error_body

DONE = "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def sse_error(status: int, message: str, code: str | None = None) -> str:
    return sse(error_body(status, message, None, code))


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
    num_cached_tokens: int = 0  # prompt tokens of the choice's prompt served from the prefix cache


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
                        index,
                        c.delta_text,
                        new_logprobs,
                        c.finish_reason,
                        c.stop_reason,
                        num_tokens=len(c.token_ids),
                        num_cached_tokens=out.num_cached_tokens,
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
