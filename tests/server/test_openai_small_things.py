"""What real OpenAI clients need beyond generation: `models.retrieve`, vLLM's `/tokenizer_info`, the
fields OpenAI clients send that this server accepts and ignores, usage in every streamed chunk
(`continuous_usage_stats`) with cached prompt tokens, and the 400s for `stream_options` without `stream`
and for a message role OpenAI does not have.

Through the official `openai` SDK and httpx against the session's real server (SmolLM2-135M-Instruct);
the answer of a model without a tokenizer comes from a server over the session's tiny GPT-J.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gptserve.loading.default_model import default_model_path
from gptserve.loading.gguf_file import GGUFModelFile
from gptserve.server.openai_protocol import IGNORED_FIELDS
from tests.server.conftest import ServerProcess, start_server

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name a colour."}]
IGNORED_VALUES: dict[str, Any] = {
    "store": True,
    "metadata": {"team": "search", "run": "7"},
    "user": "user-1234",
    "service_tier": "auto",
}


def error_of(
    status: type[openai.APIStatusError], call: Callable[..., Any], *args: Any, **kwargs: Any
) -> dict:
    """The error object of `call(*args, **kwargs)`, refused with `status`; it must be OpenAI's shape."""
    with pytest.raises(status) as info:
        call(*args, **kwargs)
    body = info.value.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def create(client: openai.OpenAI, route: str, model: str, **kwargs: Any) -> Any:
    """A short request on `route` ("chat" or "completions"); `kwargs` add to or replace its fields."""
    if route == "chat":
        return client.chat.completions.create(**{"model": model, "messages": CHAT, "max_tokens": 2, **kwargs})
    return client.completions.create(**{"model": model, "prompt": PROMPT, "max_tokens": 2, **kwargs})


# ------------------------------------------------------------------------------------------ models
def test_models_retrieve_answers_the_listed_object(client: openai.OpenAI, model_name: str) -> None:
    (listed,) = client.models.list().data
    model = client.models.retrieve(model_name)
    assert model.model_dump() == listed.model_dump()
    assert model.id == model_name and model.object == "model" and model.owned_by == "gptserve"


@pytest.mark.parametrize("name", ["gpt-4o", "org/not-served"])
def test_models_retrieve_unknown_is_404(client: openai.OpenAI, name: str) -> None:
    error = error_of(openai.NotFoundError, client.models.retrieve, name)
    assert error["param"] == "model" and error["code"] == "model_not_found"
    assert error["type"] == "not_found_error" and name in error["message"]


# ----------------------------------------------------------------------------------- tokenizer info
def test_tokenizer_info_describes_the_served_tokenizer(server: ServerProcess) -> None:
    r = httpx.get(f"{server.url}/tokenizer_info", timeout=30)
    assert r.status_code == 200, r.text
    info = r.json()
    checkpoint = GGUFModelFile(default_model_path()).checkpoint()
    tokenizer = checkpoint.tokenizer
    assert info["tokenizer_class"] == type(tokenizer).__name__
    assert info["chat_template"] == checkpoint.chat_template
    for name in ("bos", "eos", "pad", "unk"):
        assert info[f"{name}_token"] == getattr(tokenizer, f"{name}_token"), name
        assert info[f"{name}_token_id"] == getattr(tokenizer, f"{name}_token_id"), name
    assert info["eos_token"] and isinstance(info["eos_token_id"], int)
    assert info["max_model_len"] == 2048
    assert info["vocab_size"] == checkpoint.hf_config["vocab_size"]
    assert not [key for key in info if key.endswith("_file")], "paths on the server's disk stay out"
    # The server tokenizes as the described tokenizer does.
    eos = httpx.post(
        f"{server.url}/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}
    )
    assert eos.json()["tokens"] == [info["eos_token_id"]]


def test_tokenizer_info_of_a_model_without_tokenizer(tiny_gptj: tuple[Path, Any]) -> None:
    proc = start_server(str(tiny_gptj[0]), "--served-model-name", "tiny", "--max-model-len", "256")
    try:
        r = httpx.get(f"{proc.url}/tokenizer_info", timeout=30)
    finally:
        assert proc.stop() == 0
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["tokenizer_class"] is None and "no tokenizer" in info["message"]
    assert info["vocab_size"] == 50400 and info["max_model_len"] == 256


# --------------------------------------------------------------------------- accepted and ignored
def test_the_ignored_fields_are_openais() -> None:
    assert set(IGNORED_FIELDS) == set(IGNORED_VALUES)


@pytest.mark.parametrize("field", IGNORED_FIELDS)
def test_ignored_field_is_accepted_on_chat(client: openai.OpenAI, model_name: str, field: str) -> None:
    kwargs = dict(model=model_name, messages=CHAT, max_tokens=2, temperature=0)
    plain = client.chat.completions.create(**kwargs)
    with_field = client.chat.completions.create(**kwargs, **{field: IGNORED_VALUES[field]})
    assert with_field.choices[0].message.content == plain.choices[0].message.content


@pytest.mark.parametrize("field", IGNORED_FIELDS)
def test_ignored_field_is_accepted_on_completions(client: openai.OpenAI, model_name: str, field: str) -> None:
    kwargs = dict(model=model_name, prompt=PROMPT, max_tokens=2, temperature=0)
    plain = client.completions.create(**kwargs)
    # The SDK's `completions.create` has a parameter for `user` only; the others go in the body as they are.
    extra = {field: IGNORED_VALUES[field]}
    with_field = (
        client.completions.create(**kwargs, **extra)
        if field == "user"
        else client.completions.create(**kwargs, extra_body=extra)
    )
    assert with_field.choices[0].text == plain.choices[0].text


def test_all_ignored_fields_at_once(client: openai.OpenAI, model_name: str) -> None:
    chat = create(client, "chat", model_name, **IGNORED_VALUES, parallel_tool_calls=False)
    assert chat.usage.completion_tokens <= 2
    others = {k: v for k, v in IGNORED_VALUES.items() if k != "user"}
    chunks = list(create(client, "completions", model_name, user="u", stream=True, extra_body=others))
    assert chunks[-1].choices[0].finish_reason is not None


def test_ignored_fields_keep_their_types(client: openai.OpenAI, model_name: str) -> None:
    error = error_of(openai.BadRequestError, create, client, "chat", model_name, metadata={"n": 7})
    assert error["param"].startswith("metadata")


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_an_unknown_field_is_still_400(client: openai.OpenAI, model_name: str, route: str) -> None:
    error = error_of(openai.BadRequestError, create, client, route, model_name, extra_body={"stor": True})
    assert error["param"] == "stor" and "stor" in error["message"]


def test_parallel_tool_calls_is_chat_only(client: openai.OpenAI, model_name: str) -> None:
    assert create(client, "chat", model_name, parallel_tool_calls=True).choices
    unknown = {"parallel_tool_calls": True}
    error = error_of(openai.BadRequestError, create, client, "completions", model_name, extra_body=unknown)
    assert error["param"] == "parallel_tool_calls"


# ------------------------------------------------------------------------------ streamed usage
def check_running_usage(chunks: list[Any], final_completion_tokens: int) -> None:
    """Every chunk with choices carries the usage so far: the prompt, output tokens that never decrease
    and end at the final count, and their total."""
    running = [c.usage for c in chunks if c.choices]
    assert running and all(u is not None for u in running)
    prompt_tokens = running[0].prompt_tokens
    counts = [u.completion_tokens for u in running]
    assert counts == sorted(counts) and counts[-1] == final_completion_tokens
    for u in running:
        assert u.prompt_tokens == prompt_tokens and u.total_tokens == prompt_tokens + u.completion_tokens


def test_continuous_usage_on_completions(client: openai.OpenAI, model_name: str) -> None:
    chunks = list(
        client.completions.create(
            model=model_name,
            prompt=PROMPT,
            max_tokens=8,
            temperature=0,
            n=2,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
            extra_body={"ignore_eos": True},
        )
    )
    final = chunks[-1]
    assert final.choices == [] and final.usage.completion_tokens == 16  # both samples' tokens
    check_running_usage(chunks[:-1], 16)
    assert final.usage.prompt_tokens == chunks[0].usage.prompt_tokens == 5


def test_continuous_usage_on_chat(client: openai.OpenAI, model_name: str) -> None:
    kwargs = dict(model=model_name, messages=CHAT, max_tokens=8, temperature=0)
    whole = client.chat.completions.create(**kwargs).usage
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options=options))
    final = chunks[-1]
    assert final.choices == []
    assert (final.usage.prompt_tokens, final.usage.completion_tokens, final.usage.total_tokens) == (
        whole.prompt_tokens,
        whole.completion_tokens,
        whole.total_tokens,
    )
    check_running_usage(chunks[:-1], whole.completion_tokens)
    assert chunks[0].usage.completion_tokens == 0  # the role chunk, before any token


def test_continuous_usage_without_include_usage(client: openai.OpenAI, model_name: str) -> None:
    options = {"continuous_usage_stats": True}
    chunks = list(create(client, "chat", model_name, max_tokens=4, stream=True, stream_options=options))
    assert all(c.choices for c in chunks), "no usage-only chunk without include_usage"
    check_running_usage(chunks, chunks[-1].usage.completion_tokens)


def test_streamed_usage_counts_cached_prompt_tokens(client: openai.OpenAI, model_name: str) -> None:
    prompt = "A long and particular prompt, written to fill several blocks of the prefix cache: " * 3
    kwargs = dict(model=model_name, prompt=prompt, max_tokens=2, temperature=0)
    client.completions.create(**kwargs)  # fills the prefix cache
    again = client.completions.create(**kwargs).usage
    assert again.prompt_tokens_details and again.prompt_tokens_details.cached_tokens >= 16
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options=options))
    streamed = chunks[-1].usage
    assert streamed.prompt_tokens_details.cached_tokens == again.prompt_tokens_details.cached_tokens
    assert chunks[-2].usage.prompt_tokens_details.cached_tokens == again.prompt_tokens_details.cached_tokens


# ------------------------------------------------------------------------------------------ 400s
@pytest.mark.parametrize("route", ["chat", "completions"])
@pytest.mark.parametrize("stream", [{}, {"stream": False}], ids=["stream-absent", "stream-false"])
def test_stream_options_without_stream_is_400(
    client: openai.OpenAI, model_name: str, route: str, stream: dict[str, bool]
) -> None:
    options = {"include_usage": True}
    error = error_of(
        openai.BadRequestError, create, client, route, model_name, stream_options=options, **stream
    )
    assert error["param"] == "stream_options" and "stream" in error["message"]


def test_unknown_role_is_400_naming_it(server: ServerProcess, client: openai.OpenAI, model_name: str) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "wizard", "content": "hi"}]
    error = error_of(openai.BadRequestError, create, client, "chat", model_name, messages=messages)
    assert error["param"] == "messages[1].role" and "messages[1].role" in error["message"]
    r = httpx.post(f"{server.url}/tokenize", json={"messages": messages}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[1].role"
    for role in ("developer", "tool"):  # OpenAI's roles are all accepted
        ok = httpx.post(f"{server.url}/tokenize", json={"messages": [{"role": role, "content": "x"}]})
        assert ok.status_code == 200, (role, ok.text)
