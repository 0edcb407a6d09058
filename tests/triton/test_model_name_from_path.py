"""A model served from a directory is a Triton model named after the directory (`.../tiny-llama` ->
`tiny-llama`), as Triton names models, so every `/v2/models/{name}/...` route and tritonclient reach
it and the API key guards it; the OpenAI name stays the path, as vLLM's does."""

from __future__ import annotations

import shutil

import httpx
import numpy as np
import pytest
import tritonclient.http as triton_http

from tests.server.conftest import start_server

API_KEY = "sesame"


@pytest.fixture(scope="module")
def served(tiny_gptj_tokenized, tmp_path_factory):
    directory = tmp_path_factory.mktemp("models") / "tiny-llama"
    shutil.copytree(tiny_gptj_tokenized, directory)
    proc = start_server(str(directory), "--max-model-len", "128", "--api-key", API_KEY)
    yield proc, directory
    assert proc.stop() == 0


def test_the_triton_name_is_the_directory_name(served):
    proc, directory = served
    auth = {"Authorization": f"Bearer {API_KEY}"}
    index = httpx.post(f"{proc.url}/v2/repository/index", headers=auth, json={}).json()
    assert "tiny-llama" in [row["name"] for row in index]
    assert httpx.get(f"{proc.url}/v2/models/tiny-llama/ready", headers=auth).status_code == 200
    assert httpx.get(f"{proc.url}/v2/models/tiny-llama", headers={}).status_code == 401  # the key guards it
    openai_names = [m["id"] for m in httpx.get(f"{proc.url}/v1/models", headers=auth).json()["data"]]
    assert openai_names == [str(directory)]


def test_tritonclient_reaches_it_by_that_name(served):
    proc, _ = served
    client = triton_http.InferenceServerClient(proc.url.removeprefix("http://"))
    headers = {"Authorization": f"Bearer {API_KEY}"}
    assert client.is_model_ready("tiny-llama", headers=headers)
    metadata = client.get_model_metadata("tiny-llama", headers=headers)
    assert metadata["name"] == "tiny-llama"
    text = triton_http.InferInput("text_input", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"Hello"]], dtype=object))
    length = triton_http.InferInput("max_tokens", [1, 1], "INT32")
    length.set_data_from_numpy(np.array([[4]], dtype=np.int32))
    result = client.infer("tiny-llama", [text, length], headers=headers)
    assert result.get_response()["model_name"] == "tiny-llama"
    assert result.as_numpy("text_output").size == 1
