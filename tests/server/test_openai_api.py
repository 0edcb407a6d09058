"""The OpenAI-compatible routes through the official `openai` SDK against the real server."""

from __future__ import annotations

import httpx
import openai

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name a colour."}]


def test_models(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct"]
    assert models[0].object == "model"


def test_completion(client: openai.OpenAI, model_name: str) -> None:
    r = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.model == model_name
    (choice,) = r.choices
    assert choice.text and choice.finish_reason == "length"
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 5 and r.usage.total_tokens == 10


def test_chat(client: openai.OpenAI, model_name: str) -> None:
    r = client.chat.completions.create(
        model=model_name, messages=CHAT, max_completion_tokens=6, temperature=0
    )
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 6 and r.usage.prompt_tokens > 10


def test_streamed_completion_equals_non_streamed(client: openai.OpenAI, model_name: str) -> None:
    kwargs = dict(model=model_name, prompt=PROMPT, max_tokens=8, temperature=0)
    whole = client.completions.create(**kwargs).choices[0]
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_streamed_chat_equals_non_streamed(client: openai.OpenAI, model_name: str) -> None:
    kwargs = dict(model=model_name, messages=CHAT, max_tokens=8, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0]
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.message.content
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason


def test_n2_and_prompt_forms(server, client: openai.OpenAI, model_name: str) -> None:
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    kwargs = dict(model=model_name, max_tokens=4, temperature=0)
    texts = client.completions.create(prompt=[PROMPT, "Once upon a time"], n=2, **kwargs)
    assert [c.index for c in texts.choices] == [0, 1, 2, 3]
    assert texts.choices[0].text == texts.choices[1].text  # greedy: both samples agree
    assert texts.usage.completion_tokens == 16
    one_ids = client.completions.create(prompt=ids, **kwargs)
    many_ids = client.completions.create(prompt=[ids, ids[:2]], **kwargs)
    assert one_ids.choices[0].text == many_ids.choices[0].text == texts.choices[0].text
    assert many_ids.usage.prompt_tokens == len(ids) + 2
    sampled = client.chat.completions.create(model=model_name, messages=CHAT, n=2, max_tokens=4, seed=7)
    assert [c.index for c in sampled.choices] == [0, 1]


def test_completion_logprobs(client: openai.OpenAI, model_name: str) -> None:
    r = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and len(top) == 3
        assert max(top.values()) == logprob and top[token] == logprob  # greedy picks the top token


def test_chat_logprobs(client: openai.OpenAI, model_name: str) -> None:
    r = client.chat.completions.create(
        model=model_name, messages=CHAT, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    assert 1 <= len(content) <= 4
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert bytes(t.bytes).decode() == t.token and len(t.top_logprobs) == 2
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == t.logprob


def test_stop_string(client: openai.OpenAI, model_name: str) -> None:
    kwargs = dict(model=model_name, prompt=PROMPT, max_tokens=8, temperature=0)
    full = client.completions.create(**kwargs).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), f"pick a prompt whose greedy text has a usable middle: {full!r}"
    cut = client.completions.create(stop=[stop, "never-there"], **kwargs).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[: full.index(stop)]
    streamed = client.completions.create(stop=stop, stream=True, **kwargs)
    assert "".join(c.choices[0].text for c in streamed) == cut.text


def test_vllm_extras(client: openai.OpenAI, model_name: str) -> None:
    r = client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=6, temperature=0.8, seed=3,
        extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1, "ignore_eos": True,
                    "min_tokens": 6, "stop_token_ids": [2], "skip_special_tokens": True},
    )  # fmt: skip
    assert r.usage.completion_tokens == 6


def test_tokenize_detokenize(server) -> None:
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": "Hello world", "return_token_strs": True})
    body = r.json()
    assert r.status_code == 200 and body["count"] == len(body["tokens"]) == 2
    assert body["token_strs"] == ["Hello", " world"] and body["max_model_len"] == 2048
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": CHAT}).json()
    assert chat["count"] > 10
    back = httpx.post(f"{server.url}/detokenize", json={"tokens": body["tokens"]}).json()
    assert back == {"prompt": "Hello world"}
