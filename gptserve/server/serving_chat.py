"""`POST /v1/chat/completions`: messages -> chat template -> one engine request with `n` samples.

With `tools`, the output of each choice is read for tool calls (`tool_request.py`), and streamed through
`ToolStream`, which holds back what may be a call until it can be parsed."""

from __future__ import annotations

import dataclasses
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
from gptserve.server.chat_stream import ChatChoiceStream
from gptserve.server.errors import bad_request, to_api_error
from gptserve.server.openai_format import chat_logprobs, usage, vllm_prompt_logprobs
from gptserve.server.openai_params import build_sampling_params
from gptserve.server.openai_protocol import ChatCompletionRequest
from gptserve.server.serving import OpenAIServing
from gptserve.server.stream_usage import StreamUsage, check_stream_options
from gptserve.server.streaming import DONE, choice_deltas, final_outputs, sse, sse_error
from gptserve.server.structured_request import compile_constraint
from gptserve.server.tool_request import ToolPlan, plan_tools, tool_calls_json


@dataclass
class _Job:
    id: str
    model: str
    created: int
    req: ChatCompletionRequest
    stream: RequestStream
    num_top: int | None  # top_logprobs per token, None = no logprobs
    tools: ToolPlan

    def body(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, **extra}  # fmt: skip

    @property
    def object(self) -> str:
        return "chat.completion.chunk" if self.req.stream else "chat.completion"


def _check_unsupported(req: ChatCompletionRequest) -> None:
    if req.echo:
        raise bad_request("echo is not supported for chat completions", "echo")
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")


async def create_chat_completion(
    serving: OpenAIServing, req: ChatCompletionRequest, raw: Request
) -> Response:
    model = serving.model_name(req.model)
    check_stream_options(req)
    _check_unsupported(req)
    max_tokens_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    num_top = (req.top_logprobs or 0) if req.logprobs else None
    renames = {"max_tokens": max_tokens_param, "logprobs": "top_logprobs"}
    if req.stream and req.prompt_logprobs is not None:
        raise bad_request("prompt_logprobs is served without streaming", "stream")
    params = build_sampling_params(
        req, max_tokens, num_top, renames, req.prompt_logprobs, serving.sampling_defaults
    )
    tools = plan_tools(req, serving.tool_parser)
    if tools.constraint is not None:
        if params.structured_outputs is not None:
            raise bad_request(
                f"{params.structured_outputs.param} cannot be combined with a required or named tool_choice",
                params.structured_outputs.param,
            )
        params = dataclasses.replace(params, structured_outputs=tools.constraint)
    if tools.active and tools.parser.marker_is_special:
        params = dataclasses.replace(params, skip_special_tokens=False)
    await compile_constraint(serving, params)
    text = serving.render_chat(
        req.messages, req.add_generation_prompt, req.continue_final_message, req.chat_template_kwargs, tools
    )
    job_id = f"chatcmpl-{uuid.uuid4().hex}"
    (stream,) = serving.admit(job_id, [text], params, "messages", max_tokens_param, add_special_tokens=False)
    job = _Job(job_id, model, int(time.time()), req, stream, num_top, tools)
    if req.stream:
        return StreamingResponse(_stream(serving, job), media_type="text/event-stream")
    result = await cancel_on_disconnect(raw, _complete(serving, job))
    return result if isinstance(result, Response) else JSONResponse(result)


async def _complete(serving: OpenAIServing, job: _Job) -> dict[str, Any]:
    try:
        (out,) = await final_outputs([job.stream])
    except GptServeError as e:
        raise to_api_error(e) from None
    choices = []
    for c in out.outputs:
        logprobs = (
            None if job.num_top is None else chat_logprobs(c.logprobs or [], serving.tokens, job.num_top)
        )
        reasoning, text = (None, c.text) if serving.reasoning is None else serving.reasoning.split(c.text)
        message: dict[str, Any] = {"role": "assistant", "content": text}
        parsed = job.tools.parse(text)
        if parsed is not None:
            message = {"role": "assistant", "content": parsed.content, "tool_calls": tool_calls_json(parsed)}
        if serving.reasoning is not None:
            message["reasoning_content"] = reasoning
        choices.append(
            {"index": c.index, "message": message, "logprobs": logprobs,
             "finish_reason": job.tools.finish_reason(c.finish_reason, parsed), "stop_reason": c.stop_reason}
        )  # fmt: skip
    completion_tokens = sum(len(c.token_ids) for c in out.outputs)
    extra: dict[str, Any] = {}
    if job.req.prompt_logprobs is not None:
        extra["prompt_logprobs"] = vllm_prompt_logprobs(out.prompt_logprobs or [], serving.tokens)
    return job.body(
        choices,
        usage=usage(job.stream.num_prompt_tokens, completion_tokens, out.num_cached_tokens),
        **extra,
    )


async def _stream(serving: OpenAIServing, job: _Job) -> AsyncIterator[str]:
    req = job.req
    counted = StreamUsage(req, job.stream.num_prompt_tokens)

    def chunk(index: int, delta: dict[str, Any], logprobs: Any = None, finish: str | None = None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return sse(job.body([choice], **counted.chunk_fields()))

    choices = [ChatChoiceStream(job.tools, serving.reasoning) for _ in range(req.n)]
    try:
        for i in range(req.n):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for d in choice_deltas([job.stream], req.n):
            counted.update(d)
            logprobs = None
            if job.num_top is not None and d.logprobs:
                logprobs = chat_logprobs(d.logprobs, serving.tokens, job.num_top)
            choice = choices[d.index]
            deltas = choice.feed(d.text)
            finish = d.finish_reason
            if finish is not None:
                more, finish = choice.finish(finish)
                deltas += more
            if not deltas and (choice.plain or logprobs or finish):
                deltas = [{}]
            for k, delta in enumerate(deltas):
                last = k == len(deltas) - 1
                yield chunk(d.index, delta, logprobs if k == 0 else None, finish if last else None)
        final = counted.final()
        if final is not None:
            yield sse(job.body([], usage=final))
    except (APIError, GptServeError) as e:
        err = e if isinstance(e, APIError) else to_api_error(e)
        yield sse_error(err.status, err.message, err.code)
    finally:
        abort_all([job.stream])
    yield DONE
