"""`OpenAIServing`: what every OpenAI route shares — the served model names, the chat template, token
text, and admitting a request's prompts to the engine (with the queue limit), plus the HTTP forms of the
engine's own failures."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from gptserve.errors import InvalidRequestError, QueueFullError, RequestTimeoutError
from gptserve.sampling_params import SamplingParams
from gptserve.server.async_engine import AsyncEngine, EngineDeadError
from gptserve.server.chat_template import ChatTemplate, message_dicts
from gptserve.server.errors import APIError, from_invalid_request
from gptserve.server.openai_format import TokenText
from gptserve.server.request_stream import RequestStream
from gptserve.server.streaming import abort_all


def queue_full(error: QueueFullError) -> APIError:
    """503 with `Retry-After`, as for every overloaded route."""
    return APIError(503, str(error), code="queue_full", headers={"Retry-After": "1"})


def timed_out(error: RequestTimeoutError) -> APIError:
    return APIError(408, str(error), code="request_timeout")


class OpenAIServing:
    def __init__(
        self,
        engine: AsyncEngine,
        served_model_names: Sequence[str],
        chat_template: ChatTemplate,
        max_queue_len: int | None = None,
        model_path: str | None = None,
    ):
        self.engine = engine
        self.served_model_names = list(served_model_names)
        self.chat_template = chat_template
        if max_queue_len is not None:
            engine.max_queue_len = max_queue_len
        self.model_path = model_path
        self.max_model_len = engine.engine.max_model_len
        self.tokenizer = engine.engine.tokenizer
        self.tokens = TokenText(self.tokenizer)
        self.created = int(time.time())

    def model_name(self, requested: str | None) -> str:
        """The name to answer with; a 404 for a model this server does not serve."""
        if requested is None:
            return self.served_model_names[0]
        if requested not in self.served_model_names:
            served = ", ".join(self.served_model_names)
            raise APIError(
                404, f"The model `{requested}` does not exist; this server serves: {served}", "model",
                "model_not_found",
            )  # fmt: skip
        return requested

    def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.engine.tokenize(text, add_special_tokens)

    def check_token_ids(self, token_ids: Sequence[int], param: str) -> None:
        """A 400 naming `param` unless every id is in the vocabulary (the tokenizer cannot decode the
        others: an id below 0 or beyond 64 bits makes it raise `OverflowError`)."""
        vocab = self.engine.engine.model_config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"{param} holds token id {bad[0]} outside the vocabulary of {vocab}", param)

    def decode(self, token_ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            raise APIError(
                400, "this model has no tokenizer, so token ids cannot be turned into text", "tokens"
            )
        return self.tokenizer.decode(list(token_ids))

    def render_chat(
        self, messages: list, add_generation_prompt: bool, continue_final_message: bool, kwargs: dict | None
    ) -> str:
        return self.chat_template.render(
            message_dicts(messages), add_generation_prompt, continue_final_message, kwargs
        )

    async def admit(
        self, request_id: str, prompts: list[list[int]], params: list[SamplingParams]
    ) -> list[RequestStream]:
        """Queue one engine request per prompt, all in the same engine iteration; all or none."""
        engine = self.engine
        if engine.dead:
            raise APIError(503, "the engine has stopped; the server is shutting down")
        try:
            engine.check_capacity(len(prompts))
        except QueueFullError as e:
            raise queue_full(e) from None
        results = await asyncio.gather(
            *(
                engine.add_request(f"{request_id}-{i}", p, sp)
                for i, (p, sp) in enumerate(zip(prompts, params))
            ),
            return_exceptions=True,
        )
        streams = [r for r in results if isinstance(r, RequestStream)]
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            abort_all(streams)
            error = errors[0]
            if isinstance(error, InvalidRequestError):
                raise from_invalid_request(error)
            if isinstance(error, EngineDeadError):
                raise APIError(503, str(error))
            raise error
        return streams
