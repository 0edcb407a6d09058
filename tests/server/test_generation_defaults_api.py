"""A served model directory with a `generation_config.json`: its values reach every request field left
out (OpenAI completions and chat, the Triton text form) and no field a request sets; `/v1/models`
reports them; an explicit `temperature: 0` stays greedy."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import httpx
import pytest

from tests.clients.conftest import CHAT_TEMPLATE
from tests.server.conftest import ServerProcess, start_tiny_gptj_server

MODEL = "tiny-defaults"
CONFIG = {"temperature": 0.8, "top_p": 0.9, "top_k": 5, "min_p": 0.02, "repetition_penalty": 1.3}
BUILTIN = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def server(tiny_gptj_tokenized, tmp_path_factory) -> Iterator[ServerProcess]:
    model = tmp_path_factory.mktemp("tiny-gptj-generation-config")
    shutil.copytree(tiny_gptj_tokenized, model, dirs_exist_ok=True)
    (model / "generation_config.json").write_text(json.dumps({**CONFIG, "do_sample": True}))
    proc = start_tiny_gptj_server(model, tmp_path_factory.mktemp("template"), MODEL, 256, CHAT_TEMPLATE)
    try:
        yield proc
    finally:
        assert proc.stop() == 0


def complete(server: ServerProcess, **fields) -> str:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 16, "seed": 11, **fields}
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_models_endpoint_reports_the_defaults(server):
    card = httpx.get(f"{server.url}/v1/models/{MODEL}", timeout=10).json()
    defaults = card["sampling_defaults"]
    assert defaults.pop("source").endswith("generation_config.json")
    assert defaults == CONFIG


def test_fields_left_out_take_the_model_defaults(server):
    left_out = complete(server)
    assert left_out == complete(server, **CONFIG)
    assert left_out != complete(server, **BUILTIN)
    # One field set: it wins, the others still come from the model.
    assert complete(server, top_k=1) == complete(server, **{**CONFIG, "top_k": 1})


def test_explicit_temperature_zero_stays_greedy(server):
    greedy = complete(server, temperature=0)
    assert greedy == complete(server, temperature=0, seed=12) == complete(server, top_k=1)


def test_chat_and_triton_text_form_take_the_defaults(server):
    def chat(**fields) -> str:
        body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 16,
                "seed": 3, **fields}  # fmt: skip
        response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"]

    assert chat() == chat(**CONFIG) != chat(**BUILTIN)

    def text_form(**fields) -> str:
        body = {"text_input": PROMPT, "max_tokens": 16, "random_seed": 3, **fields}
        response = httpx.post(f"{server.url}/v2/models/{MODEL}/generate", json=body, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["text_output"]

    ft_names = {"temperature": 0.8, "runtime_top_p": 0.9, "runtime_top_k": 5, "min_p": 0.02,
                "repetition_penalty": 1.3}  # fmt: skip
    ft_builtin = {"temperature": 1.0, "runtime_top_p": 1.0, "runtime_top_k": 0, "repetition_penalty": 1.0}
    assert text_form() == text_form(**ft_names) != text_form(**ft_builtin)
