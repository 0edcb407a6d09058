"""`gptserve client -i openai --json-schema FILE` against the real server: the schema goes as
`response_format` to chat completions and as `guided_json` to completions, and every answer that ends
by itself ("stop") is JSON the schema accepts. The Triton protocols refuse the flag, and an unreadable
file or one that is not JSON is a usage error, all before anything is sent."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tests.clients.test_client_cli import client

SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "label": {"type": "string", "maxLength": 8},
    },
    "required": ["color", "count", "label"],
    "additionalProperties": False,
}
PROMPTS = ["Describe a ball as JSON.", "Once upon a time", "Hello"]


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_every_answer_follows_the_schema(capsys, tmp_path, tiny_server, chat):
    path = tmp_path / "ball.json"
    path.write_text(json.dumps(SCHEMA))
    extra = ["--chat"] if chat else []
    rc, doc, err = client(
        capsys, tiny_server, "openai", "--json", "--json-schema", str(path), "--max-tokens", "60", *extra,
        *PROMPTS,
    )  # fmt: skip
    assert rc == 0, err
    results = doc["results"]
    assert len(results) == len(PROMPTS) and all(r["error"] is None for r in results)
    stopped = [r for r in results if r["finish_reason"] == "stop"]
    assert stopped, results  # the schema's answers are short: most end well before 60 tokens
    for r in stopped:
        jsonschema.validate(json.loads(r["text"]), SCHEMA)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_triton_protocols_refuse_it(capsys, tmp_path, tiny_server, protocol):
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(SCHEMA))
    rc, _, err = client(capsys, tiny_server, protocol, "--json-schema", str(path), "hi")
    assert rc == 2 and "--json-schema needs --protocol openai" in err


def test_unreadable_or_invalid_schema_files(capsys, tmp_path, tiny_server):
    missing = tmp_path / "missing.json"
    rc, _, err = client(capsys, tiny_server, "openai", "--json-schema", str(missing), "hi")
    assert rc == 2 and f"cannot read {missing}" in err
    broken = tmp_path / "broken.json"
    broken.write_text('{"type": "object",')
    rc, _, err = client(capsys, tiny_server, "openai", "--json-schema", str(broken), "hi")
    assert rc == 2 and f"{broken} is not valid JSON" in err
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    rc, _, err = client(capsys, tiny_server, "openai", "--json-schema", str(listed), "hi")
    assert rc == 2 and "is not a JSON schema" in err
