"""The OpenAI-compatible protocol: `/v1/completions` and `/v1/chat/completions`, streamed or not.

Used by `gptserve client --protocol openai` (one prompt per request) and by `gptserve chat`
(`stream_chat`). Bad words become `logit_bias` -100 on their token (the server's `/tokenize` tells which);
a bad word of several tokens cannot be expressed that way and is refused, as is beam search. A JSON schema
goes to chat completions as OpenAI's strict `response_format`, and to completions, where OpenAI has no
such field, as vLLM's `guided_json`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import httpx

from gptserve.client.http_common import auth_headers, check_response, connect_error, sse_events
from gptserve.client.types import ClientError, OnText, Options, Prompt, Result


def api_base(url: str) -> str:
    """`http://host:port/v1` from a server address given with or without `/v1`."""
    url = url.rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    return url if url.endswith("/v1") else f"{url}/v1"


def structured_body(options: Options, chat: bool) -> dict[str, Any]:
    """The request field that constrains the answer to `options.json_schema`."""
    if chat:
        name = re.sub(r"[^A-Za-z0-9_-]", "_", options.json_schema_name)[:64] or "schema"
        schema = {"name": name, "schema": options.json_schema, "strict": True}
        return {"response_format": {"type": "json_schema", "json_schema": schema}}
    return {"guided_json": options.json_schema}


class OpenAIClient:
    """A thread-safe client of one server's OpenAI-compatible routes."""

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None, timeout: float = 600):
        self.base = api_base(url)
        self.http = httpx.Client(base_url=self.base, headers=auth_headers(api_key), timeout=timeout)
        self._model = model

    def close(self) -> None:
        self.http.close()

    @property
    def model(self) -> str:
        """The model asked for, or else the server's first."""
        if self._model is None:
            data = self._get("/models").get("data") or []
            if not data:
                raise ClientError(f"the server at {self.base} lists no models")
            self._model = str(data[0]["id"])
        return self._model

    def _get(self, path: str) -> dict[str, Any]:
        try:
            response = self.http.get(path)
        except httpx.TransportError as e:
            raise connect_error(self.base, e) from None
        check_response(response)
        return response.json()

    def _bad_word_bias(self, words: list[str]) -> dict[str, float]:
        bias: dict[str, float] = {}
        root = self.base.removesuffix("/v1")
        for word in words:
            response = self.http.post(f"{root}/tokenize", json={"prompt": word, "add_special_tokens": False})
            check_response(response)
            tokens = response.json()["tokens"]
            if len(tokens) != 1:
                raise ClientError(
                    f"bad word {word!r} is {len(tokens)} tokens; over the OpenAI protocol only single-token "
                    "words can be banned (logit_bias): use --protocol http or grpc"
                )
            bias[str(tokens[0])] = -100.0
        return bias

    def sampling_body(self, options: Options) -> dict[str, Any]:
        """The request fields for `options` (greedy unless sampling was asked for)."""
        if options.beam_width > 1:
            raise ClientError("beam search is not part of the OpenAI protocol: use --protocol http or grpc")
        body: dict[str, Any] = {"model": self.model, "max_tokens": options.max_tokens}
        body["temperature"] = 0.0 if options.greedy and options.temperature is None else options.temperature
        extras = {"top_k": options.top_k, "top_p": options.top_p, "seed": options.seed}
        extras["repetition_penalty"] = options.repetition_penalty
        body.update({k: v for k, v in extras.items() if v is not None})
        if body["temperature"] is None:
            del body["temperature"]
        if options.stop_words:
            body["stop"] = list(options.stop_words)
        if options.bad_words:
            body["logit_bias"] = self._bad_word_bias(options.bad_words)
        return body

    def generate(
        self, index: int, prompt: Prompt, options: Options, chat: bool = False, on_text: OnText | None = None
    ) -> Result:
        """One prompt, as a completion (or a one-message chat), streamed when `options.stream`."""
        body = self.sampling_body(options)
        if chat:
            if not isinstance(prompt, str):
                raise ClientError("--chat needs text prompts, not token ids")
            path, body["messages"] = "/chat/completions", [{"role": "user", "content": prompt}]
        else:
            path, body["prompt"] = "/completions", prompt
        if options.json_schema is not None:
            body.update(structured_body(options, chat))
        result = Result(index, prompt)
        start = time.perf_counter()
        if options.stream:
            body["stream"], body["stream_options"] = True, {"include_usage": True}
            for event in self._stream(path, body):
                for choice in event.get("choices") or []:
                    piece = choice.get("text") if not chat else (choice.get("delta") or {}).get("content")
                    if piece:
                        if result.ttft_s is None:
                            result.ttft_s = time.perf_counter() - start
                        result.text += piece
                        if on_text is not None:
                            on_text(piece)
                    result.finish_reason = choice.get("finish_reason") or result.finish_reason
                if event.get("usage"):
                    result.num_tokens = event["usage"].get("completion_tokens")
        else:
            reply = self._post(path, body)
            choice = reply["choices"][0]
            result.text = choice["message"]["content"] if chat else choice["text"]
            result.finish_reason = choice.get("finish_reason")
            result.num_tokens = (reply.get("usage") or {}).get("completion_tokens")
        result.beams = [result.text]
        result.latency_s = time.perf_counter() - start
        return result

    def stream_chat(self, messages: list[dict[str, str]], options: Options) -> Iterator[str]:
        """The answer to a conversation, piece by piece. Closing the iterator closes the connection,
        which stops the generation on the server."""
        body = self.sampling_body(options)
        body.update(messages=messages, stream=True)
        for event in self._stream("/chat/completions", body):
            for choice in event.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    yield piece

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = self.http.post(path, json=body)
        except httpx.TransportError as e:
            raise connect_error(self.base, e) from None
        check_response(response)
        return response.json()

    def _stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        try:
            with self.http.stream("POST", path, json=body) as response:
                check_response(response)
                yield from sse_events(response)
        except httpx.TransportError as e:
            raise connect_error(self.base, e) from None
