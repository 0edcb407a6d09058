"""The OpenAI-compatible routes (`/v1/models`, `/v1/models/{id}`, `/v1/completions`,
`/v1/chat/completions`) and vLLM's `/tokenize`, `/detokenize` and `/tokenizer_info`. Handlers are thin:
the work is in `serving_*.py` and `tokenizer_info.py`."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from gptserve.frontend.unicode_json import UnicodeJSONRoute
from gptserve.server.errors import bad_request
from gptserve.server.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)
from gptserve.server.openapi_doc import NOT_FOUND, UNAVAILABLE, json_body
from gptserve.server.serving import OpenAIServing
from gptserve.server.serving_chat import create_chat_completion
from gptserve.server.serving_completions import create_completion
from gptserve.server.tokenizer_info import tokenizer_info
from gptserve.server.tool_request import ToolPlan


def build_openai_router(serving: OpenAIServing, auth: Any) -> APIRouter:
    """The routes, each guarded by the `auth` dependency."""
    router = APIRouter(dependencies=[Depends(auth)], route_class=UnicodeJSONRoute)

    @router.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [serving.model_card(name) for name in serving.served_model_names]}

    # `:path`: a served name may hold a `/` (`--served-model-name org/model`)
    @router.get("/v1/models/{model_id:path}", responses=NOT_FOUND)
    async def retrieve_model(model_id: str) -> dict[str, Any]:
        return serving.model_card(serving.model_name(model_id))

    @router.post("/v1/completions", responses=UNAVAILABLE)
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        return await create_completion(serving, body, raw)

    @router.post("/v1/chat/completions", responses=UNAVAILABLE)
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        return await create_chat_completion(serving, body, raw)

    @router.post("/tokenize", openapi_extra=json_body(TokenizeCompletionRequest, TokenizeChatRequest))
    async def tokenize(raw: Request) -> dict[str, Any]:
        body = await _json_object(raw)
        try:
            if "messages" in body:
                chat = TokenizeChatRequest.model_validate(body)
                serving.model_name(chat.model)
                tools = ToolPlan(serving.tool_parser, "auto" if chat.tools else None, chat.tools or [])
                text = serving.render_chat(
                    chat.messages, chat.add_generation_prompt, chat.continue_final_message,
                    chat.chat_template_kwargs, tools,
                )  # fmt: skip
                add_special, want_strs = chat.add_special_tokens, chat.return_token_strs
            else:
                plain = TokenizeCompletionRequest.model_validate(body)
                serving.model_name(plain.model)
                text, add_special, want_strs = plain.prompt, plain.add_special_tokens, plain.return_token_strs
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None
        tokens = serving.tokenize(text, add_special)
        strs = [serving.tokens.text(t) for t in tokens] if want_strs else None
        return {
            "count": len(tokens),
            "max_model_len": serving.max_model_len,
            "tokens": tokens,
            "token_strs": strs,
        }

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        serving.model_name(body.model)
        serving.check_token_ids(body.tokens, "tokens")
        return {"prompt": serving.decode(body.tokens)}

    @router.get("/tokenizer_info")
    async def get_tokenizer_info() -> dict[str, Any]:
        template = serving.inputs.chat_template.source
        return tokenizer_info(serving.tokenizer, template, serving.vocab_size, serving.max_model_len)

    return router


async def _json_object(raw: Request) -> dict[str, Any]:
    try:
        body = await raw.json()
    except json.JSONDecodeError as e:
        raise bad_request(f"request body is not valid JSON: {e.msg}") from None
    except ValueError:  # not UTF-8
        raise bad_request("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    return body
