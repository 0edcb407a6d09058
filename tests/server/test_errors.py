"""Every error status the OpenAI routes answer, in OpenAI's body, through the SDK's exception types."""

from __future__ import annotations

import httpx
import openai
import pytest


def _error(exc: openai.APIStatusError) -> dict:
    return exc.response.json()["error"]


def test_prompt_too_long(client: openai.OpenAI, model_name: str) -> None:
    prompt = [1] * 2000
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model_name, prompt=prompt, max_tokens=100)
    err = _error(e.value)
    assert err["param"] == "prompt" and err["code"] == "context_length_exceeded"
    assert "2000" in err["message"] and "100" in err["message"] and "2048" in err["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=model_name, messages=[{"role": "user", "content": "hi " * 2100}], max_tokens=5
        )
    assert "2048" in _error(e.value)["message"] and _error(e.value)["param"] == "messages"


@pytest.mark.parametrize(
    "field, value",
    [("temperature", -1.0), ("top_p", 1.5), ("n", 0), ("max_tokens", 0), ("presence_penalty", 3.0),
     ("logprobs", 50), ("logit_bias", {"999999": 1.0})],
)  # fmt: skip
def test_out_of_range_param_is_named(client: openai.OpenAI, model_name: str, field: str, value) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model_name, prompt="hi", max_tokens=2, extra_body={field: value})
    assert _error(e.value)["param"] == field and field in _error(e.value)["message"]


def test_chat_param_names(client: openai.OpenAI, model_name: str) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_name, messages=msgs, max_completion_tokens=-3)
    assert _error(e.value)["param"] == "max_completion_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_name, messages=msgs, logprobs=True, top_logprobs=99)
    assert _error(e.value)["param"] == "top_logprobs"


@pytest.mark.parametrize(
    "field, value",
    [("max_tokens", "ten"), ("temperature", "hot"), ("stop", 5), ("stream", "yes"), ("n", 1.5)],
)
def test_wrong_type_is_400(server, field: str, value) -> None:
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field


def test_bad_bodies(server) -> None:
    json_header = {"content-type": "application/json"}
    r = httpx.post(f"{server.url}/v1/completions", content=b"{not json", headers=json_header)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "bogus": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "bogus"
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": [99999999]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert _error(e.value)["code"] == "model_not_found" and _error(e.value)["param"] == "model"
