"""`POST /v1/completions`: prompts in every form OpenAI allows, `n` samples each, streamed or not.

Each prompt of a request is one engine request; its `n` samples are forked inside the engine. Choice
`i * n + j` is sample `j` of prompt `i`, as in OpenAI's API.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from gptserve.errors import GptServeError
from gptserve.frontend.api_error import APIError
from gptserve.frontend.disconnect import cancel_on_disconnect
from gptserve.frontend.request_stream import RequestStream, abort_all
from gptserve.server.errors import bad_request, to_api_error
from gptserve.server.openai_format import (
    completion_logprobs,
    echo_logprobs,
    joined_logprobs,
    usage,
    vllm_prompt_logprobs,
)
from gptserve.server.openai_params import build_sampling_params
from gptserve.server.openai_protocol import CompletionRequest
from gptserve.server.serving import OpenAIServing
from gptserve.server.stream_usage import StreamUsage, check_stream_options
from gptserve.server.streaming import DONE, choice_deltas, final_outputs, sse, sse_error
from gptserve.server.structured_request import compile_constraint


def _prompt_list(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], int):
        return [prompt]  # type: ignore[list-item]
    return list(prompt)  # type: ignore[arg-type]


@dataclass
class _Job:
    """One admitted completion request."""

    id: str
    model: str
    created: int
    req: CompletionRequest
    streams: list[RequestStream]
    echo: list[str] | None  # prompt texts to put in front of each choice

    @property
    def num_prompt_tokens(self) -> int:
        return sum(s.num_prompt_tokens for s in self.streams)

    def body(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, **extra}  # fmt: skip


async def create_completion(serving: OpenAIServing, req: CompletionRequest, raw: Request) -> Response:
    model = serving.model_name(req.model)
    check_stream_options(req)
    if req.suffix:
        raise bad_request("suffix is not supported", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of different from n is not supported", "best_of")
    if req.max_tokens == 0 and not req.echo:
        raise bad_request(
            "max_tokens must be at least 1 (0 only with echo: the prompt scored alone)", "max_tokens"
        )
    scored = req.echo and (req.logprobs is not None or req.max_tokens == 0)
    if req.stream and (req.prompt_logprobs is not None or (req.echo and req.logprobs is not None)):
        raise bad_request(
            "prompt log-probs (echo with logprobs, prompt_logprobs) are served without streaming", "stream"
        )
    prompts = _prompt_list(req.prompt)
    if not prompts:
        raise bad_request("prompt is empty", "prompt")
    for p in prompts:
        if not isinstance(p, str):
            serving.check_token_ids(p, "prompt")  # before `echo` decodes them
    prompt_logprobs = req.prompt_logprobs
    if scored:
        prompt_logprobs = max(prompt_logprobs or 0, req.logprobs or 0)
    params = build_sampling_params(
        req, req.max_tokens, req.logprobs, None, prompt_logprobs, serving.sampling_defaults
    )
    await compile_constraint(serving, params)
    echo = None
    if req.echo:
        echo = [p if isinstance(p, str) else serving.decode(p) for p in prompts]
    job_id = f"cmpl-{uuid.uuid4().hex}"
    streams = serving.admit(job_id, prompts, params, add_special_tokens=req.add_special_tokens)
    job = _Job(job_id, model, int(time.time()), req, streams, echo)
    if req.stream:
        return StreamingResponse(_stream(serving, job), media_type="text/event-stream")
    result = await cancel_on_disconnect(raw, _complete(serving, job))
    return result if isinstance(result, Response) else JSONResponse(result)


async def _complete(serving: OpenAIServing, job: _Job) -> dict[str, Any]:
    try:
        finals = await final_outputs(job.streams)
    except GptServeError as e:
        raise to_api_error(e) from None
    req = job.req
    choices = []
    completion_tokens = 0
    for i, out in enumerate(finals):
        prefix = job.echo[i] if job.echo else ""
        for c in out.outputs:
            completion_tokens += len(c.token_ids)
            logprobs = None
            if req.logprobs is not None:
                logprobs = completion_logprobs(c.logprobs or [], serving.tokens, len(prefix), req.logprobs)
                if req.echo:
                    prompt = echo_logprobs(
                        out.prompt_token_ids, out.prompt_logprobs or [], serving.tokens, req.logprobs
                    )
                    logprobs = joined_logprobs(prompt, logprobs)
            choice = {"index": i * req.n + c.index, "text": prefix + c.text, "logprobs": logprobs,
                      "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}  # fmt: skip
            if req.prompt_logprobs is not None:
                choice["prompt_logprobs"] = vllm_prompt_logprobs(out.prompt_logprobs or [], serving.tokens)
            choices.append(choice)
    cached = sum(out.num_cached_tokens for out in finals)
    return job.body(choices, usage=usage(job.num_prompt_tokens, completion_tokens, cached))


async def _stream(serving: OpenAIServing, job: _Job) -> AsyncIterator[str]:
    req = job.req
    counted = StreamUsage(req, job.num_prompt_tokens)
    offsets: dict[int, int] = {}

    def chunk(
        index: int, text: str, logprobs: Any = None, finish: str | None = None, stop: Any = None
    ) -> str:
        choice = {
            "index": index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": finish,
            "stop_reason": stop,
        }
        return sse(job.body([choice], **counted.chunk_fields()))

    try:
        for i, text in enumerate(job.echo or []):
            for j in range(req.n):
                offsets[i * req.n + j] = len(text)
                yield chunk(i * req.n + j, text)
        async for d in choice_deltas(job.streams, req.n):
            counted.update(d)
            logprobs = None
            if req.logprobs is not None:
                logprobs = completion_logprobs(
                    d.logprobs, serving.tokens, offsets.get(d.index, 0), req.logprobs
                )
                offsets[d.index] = offsets.get(d.index, 0) + sum(len(t) for t in logprobs["tokens"])
            yield chunk(d.index, d.text, logprobs, d.finish_reason, d.stop_reason)
        final = counted.final()
        if final is not None:
            yield sse(job.body([], usage=final))
    except (APIError, GptServeError) as e:
        err = e if isinstance(e, APIError) else to_api_error(e)
        yield sse_error(err.status, err.message, err.code)
    finally:
        abort_all(job.streams)
    yield DONE
