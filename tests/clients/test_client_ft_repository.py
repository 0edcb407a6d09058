"""`gptserve client` against FasterTransformer's GPT-J model repository, as the tutorial's last step
uses `end_to_end_test.py`: without `-m` it finds the `ensemble` (text in, CSV word lists), over HTTP
and gRPC alike, and `-m fastertransformer` takes token-id prompts."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from gptserve.cli import main
from tests.server.conftest import ServerProcess, free_port, start_server
from tests.triton.ft_repository import write_gptj_repository

PROMPTS = ["Blackhawks\n The 2015 Hilltoppers", "Hello"]


@pytest.fixture(scope="module")
def ft_server(tiny_gptj, tmp_path_factory) -> Iterator[tuple[ServerProcess, str]]:
    checkpoint, _ = tiny_gptj
    repository = write_gptj_repository(tmp_path_factory.mktemp("gptj-repository-client"), checkpoint)
    grpc_port = free_port()
    proc = start_server(
        "--model-repository", str(repository), "--max-model-len", "1024", "--kv-cache-memory", "64MiB",
        "--grpc-port", str(grpc_port),
    )  # fmt: skip
    try:
        yield proc, f"127.0.0.1:{grpc_port}"
    finally:
        assert proc.stop() == 0


def run_client(capsys, *args: str) -> tuple[int, dict]:
    capsys.readouterr()
    rc = main(["client", "--json", *args])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return rc, json.loads(out)


def test_ensemble_over_http_and_grpc(capsys, ft_server):
    server, grpc_url = ft_server
    _, http = run_client(capsys, "-u", server.url, "--max-tokens", "10", "--bad-words", "Hawks", *PROMPTS)
    _, grpc = run_client(
        capsys, "-i", "grpc", "-u", grpc_url, "--max-tokens", "10", "--bad-words", "Hawks", *PROMPTS
    )
    assert http["model"] == grpc["model"] == "ensemble"
    texts = [r["text"] for r in http["results"]]
    assert texts == [r["text"] for r in grpc["results"]] and all(texts)
    assert not any(t.startswith(p) for t, p in zip(texts, PROMPTS))  # the prompt is not repeated

    _, beams = run_client(
        capsys, "-u", server.url, "--max-tokens", "6", "-beam", "2", "-topk", "1", PROMPTS[0]
    )
    assert len(beams["results"][0]["beams"]) == 2


def test_token_model(capsys, tmp_path, ft_server):
    server, _ = ft_server
    records = tmp_path / "ids.jsonl"
    records.write_text(json.dumps({"prompt": [464, 2068, 7586]}) + "\n")
    _, doc = run_client(
        capsys, "-u", server.url, "-m", "fastertransformer", "--max-tokens", "5", "-f", str(records)
    )
    assert doc["model"] == "fastertransformer" and len(doc["results"][0]["token_ids"]) == 5
