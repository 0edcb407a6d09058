"""`OpenAIServing`: what every OpenAI route shares — the served model names, the chat template, token
text, and turning a request's prompts into admitted engine requests (through the model's input
processor, with the queue limit)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from gptserve.errors import GptServeError
from gptserve.frontend.api_error import APIError
from gptserve.frontend.async_engine import AsyncEngine
from gptserve.frontend.request_stream import RequestStream
from gptserve.sampling_params import SamplingParams
from gptserve.server.chat_messages import message_dicts
from gptserve.server.errors import to_api_error
from gptserve.server.openai_format import TokenText
from gptserve.server.reasoning import reasoning_parser as reasoning_parser_named
from gptserve.server.tool_parsers import choose_parser
from gptserve.server.tool_request import ToolPlan


class OpenAIServing:
    def __init__(
        self,
        engine: AsyncEngine,
        served_model_names: Sequence[str],
        max_queue_len: int | None = None,
        model_path: str | None = None,
        tool_call_parser: str = "auto",
        reasoning_parser: str = "none",
    ):
        self.engine = engine
        self.inputs = engine.inputs
        self.served_model_names = list(served_model_names)
        self.chat_template = engine.inputs.chat_template
        if max_queue_len is not None:
            engine.max_queue_len = max_queue_len
        self.model_path = model_path
        self.max_model_len = engine.engine.max_model_len
        self.vocab_size = engine.engine.model_config.vocab_size
        self.tokenizer = engine.engine.tokenizer
        self.sampling_defaults = engine.engine.sampling_defaults
        self.tokens = TokenText(self.tokenizer)
        self.created = int(time.time())
        self.tool_parser = choose_parser(self.chat_template.source, tool_call_parser)
        self.reasoning = reasoning_parser_named(reasoning_parser)

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

    def model_card(self, name: str) -> dict[str, Any]:
        """The `/v1/models` entry of a served name (`GET /v1/models/{name}` answers the same object)."""
        return {
            "id": name,
            "object": "model",
            "created": self.created,
            "owned_by": "gptserve",
            "root": self.model_path or name,
            "parent": None,
            "max_model_len": self.max_model_len,
            # What a request that leaves these fields out samples with (`--generation-config`).
            "sampling_defaults": {**self.sampling_defaults.values(), "source": self.sampling_defaults.source},
        }

    def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.inputs.tokenize(text, add_special_tokens)

    def check_token_ids(self, token_ids: Sequence[int], param: str) -> None:
        """A 400 naming `param` unless every id is in the vocabulary."""
        self.inputs.check_token_ids(token_ids, param)

    def decode(self, token_ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            raise APIError(
                400, "this model has no tokenizer, so token ids cannot be turned into text", "tokens"
            )
        return self.tokenizer.decode(list(token_ids))

    def render_chat(
        self,
        messages: list,
        add_generation_prompt: bool,
        continue_final_message: bool,
        kwargs: dict | None,
        tools: ToolPlan | None = None,
    ) -> str:
        """The prompt of `messages` (pydantic), with the tools and earlier calls of `tools` if given."""
        dicts = message_dicts(messages)
        if tools is not None:
            dicts = tools.messages(dicts)
            kwargs = {**(kwargs or {}), **tools.template_kwargs()}
        return self.inputs.render_chat(dicts, add_generation_prompt, continue_final_message, kwargs)

    def admit(
        self,
        request_id: str,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams,
        prompt_param: str = "prompt",
        max_tokens_param: str = "max_tokens",
        add_special_tokens: bool = True,
    ) -> list[RequestStream]:
        """One engine request per prompt, validated by the input processor (prompt + max_tokens within
        the context; a missing max_tokens takes what is left) and queued together: all or none."""
        try:
            requests = [
                self.inputs.process(
                    f"{request_id}-{i}",
                    prompt,
                    params,
                    fit_max_tokens=True,
                    prompt_param=prompt_param,
                    max_tokens_param=max_tokens_param,
                    add_special_tokens=add_special_tokens,
                )
                for i, prompt in enumerate(prompts)
            ]
            return self.engine.admit(requests)
        except GptServeError as e:
            raise to_api_error(e) from None
