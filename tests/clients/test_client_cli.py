"""`gptserve client` against a real server over the OpenAI API, Triton HTTP and Triton gRPC: the same
greedy answers on every protocol, streamed or not; prompts from arguments, files (lines, JSON Lines)
and standard input; token-id prompts; bad and stop words; beams; errors with the server's message and
a non-zero exit status."""

from __future__ import annotations

import io
import json

import httpx
import pytest

from gptserve.cli import main
from tests.clients.conftest import MAX_LEN, MODEL
from tests.server.conftest import ServerProcess

PROMPTS = ["The quick brown fox", "Once upon a time", "Hello"]
PROTOCOLS = ["openai", "http", "grpc"]


def url_for(server: ServerProcess, protocol: str) -> str:
    return server.grpc_url if protocol == "grpc" else server.url  # type: ignore[attr-defined]


def client(capsys, server: ServerProcess, protocol: str, *args: str) -> tuple[int, dict | str, str]:
    """Run `gptserve client` in this process: (exit status, parsed JSON or the printed text, stderr)."""
    capsys.readouterr()
    rc = main(["client", "-i", protocol, "-u", url_for(server, protocol), *args])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if "--json" in args else out), err


@pytest.fixture(scope="module")
def greedy(tiny_server: ServerProcess) -> list[str]:
    """The reference: greedy completions straight from the OpenAI API."""
    body = {"model": MODEL, "prompt": PROMPTS, "max_tokens": 12, "temperature": 0}
    choices = httpx.post(f"{tiny_server.url}/v1/completions", json=body, timeout=120).json()["choices"]
    return [c["text"] for c in sorted(choices, key=lambda c: c["index"])]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_same_greedy_answers_on_every_protocol(capsys, tiny_server, greedy, protocol, stream):
    extra = ["--stream"] if stream else []
    rc, doc, err = client(
        capsys, tiny_server, protocol, "--json", "--max-tokens", "12", "-c", "2", *extra, *PROMPTS
    )
    assert rc == 0, err
    assert doc["model"] == MODEL and doc["protocol"] == protocol
    results = doc["results"]
    assert [r["index"] for r in results] == [1, 2, 3]
    assert [r["prompt"] for r in results] == PROMPTS
    assert [r["text"] for r in results] == greedy
    assert all(r["error"] is None and r["latency_s"] > 0 for r in results)
    if stream:
        assert all(r["ttft_s"] is not None and r["ttft_s"] <= r["latency_s"] for r in results)
    # Every protocol fills the tokens and finish columns (Triton's text form: the output's tokens).
    assert all(r["num_tokens"] == 12 and r["finish_reason"] == "length" for r in results), results


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_triton_tokens_and_finish_columns(capsys, tiny_server, greedy, protocol):
    http_url = [] if protocol == "http" else ["--http-url", tiny_server.url]
    rc, out, err = client(capsys, tiny_server, protocol, *http_url, "--max-tokens", "12", PROMPTS[0])
    assert rc == 0, err
    row = out.splitlines()[2].split()
    assert row[:2] == ["1", "12"] and row[4] == "length", out
    # A stop word ends the answer early: finish reason "stop", fewer tokens.
    words = greedy[0].split()
    rc, doc, err = client(
        capsys, tiny_server, protocol, *http_url, "--json", "--max-tokens", "12", "--stop-words", words[1],
        PROMPTS[0],
    )  # fmt: skip
    assert rc == 0, err
    (result,) = doc["results"]
    assert result["finish_reason"] == "stop" and 0 <= result["num_tokens"] < 12, result


def test_table_and_live_streaming(capsys, tiny_server, greedy):
    rc, out, _ = client(capsys, tiny_server, "http", "--max-tokens", "12", PROMPTS[0], PROMPTS[1])
    assert rc == 0
    header, rule, *rows = out.splitlines()
    assert header.split()[:5] == ["#", "tokens", "ttft", "latency", "finish"] and set(rule) <= {"-", " "}
    assert rows[-1].startswith("2 requests, 0 failed")
    assert any(PROMPTS[1] in row for row in rows)

    rc, out, _ = client(capsys, tiny_server, "grpc", "--stream", "-c", "1", "--max-tokens", "12", PROMPTS[0])
    assert rc == 0
    assert out.startswith(f"[1] {PROMPTS[0]}\n{greedy[0]}\n")  # the answer as it streamed, then a summary
    assert out.rstrip().splitlines()[-1].startswith("1 request, 0 failed")


def test_prompts_from_files_and_stdin(capsys, monkeypatch, tmp_path, tiny_server, greedy):
    lines = tmp_path / "prompts.txt"
    lines.write_text(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n")
    rc, doc, _ = client(capsys, tiny_server, "openai", "--json", "--max-tokens", "12", "--file", str(lines))
    assert rc == 0 and [r["text"] for r in doc["results"]] == greedy[:2]

    records = tmp_path / "prompts.jsonl"
    records.write_text(json.dumps({"prompt": PROMPTS[2]}) + "\n" + json.dumps(PROMPTS[0]) + "\n")
    rc, doc, _ = client(capsys, tiny_server, "http", "--json", "--max-tokens", "12", "-f", str(records))
    assert rc == 0 and [r["text"] for r in doc["results"]] == [greedy[2], greedy[0]]

    monkeypatch.setattr("sys.stdin", io.StringIO(f"{PROMPTS[1]}\n"))
    rc, doc, _ = client(capsys, tiny_server, "grpc", "--json", "--max-tokens", "12")
    assert rc == 0 and [r["text"] for r in doc["results"]] == [greedy[1]]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_token_prompts_bad_and_stop_words_and_beams(capsys, tmp_path, tiny_server, protocol):
    ids = httpx.post(f"{tiny_server.url}/tokenize", json={"prompt": PROMPTS[0]}).json()["tokens"]
    records = tmp_path / "ids.jsonl"
    records.write_text(json.dumps({"prompt": ids}) + "\n")
    base = ["--json", "--max-tokens", "8", "-f", str(records)]
    if protocol == "grpc":
        base += ["--http-url", tiny_server.url]  # where the server tokenizes the words
    rc, doc, err = client(capsys, tiny_server, protocol, *base)
    assert rc == 0, err
    generated = doc["results"][0]["token_ids"]
    assert len(generated) == 8 and doc["results"][0]["num_tokens"] == 8

    def word(token: int) -> str:
        return httpx.post(f"{tiny_server.url}/detokenize", json={"tokens": [token]}).json()["prompt"]

    rc, doc, _ = client(capsys, tiny_server, protocol, *base, "--bad-words", word(generated[0]))
    assert rc == 0 and doc["results"][0]["token_ids"][0] != generated[0]

    rc, doc, _ = client(capsys, tiny_server, protocol, *base, "--stop-words", word(generated[2]))
    stopped = doc["results"][0]["token_ids"]
    assert rc == 0 and stopped[:2] == generated[:2] and len(stopped) <= 3

    rc, doc, _ = client(
        capsys, tiny_server, protocol, "--json", "--max-tokens", "6", "--beam-width", "2", PROMPTS[0]
    )
    assert rc == 0 and len(doc["results"][0]["beams"]) == 2


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_text_prompts_send_stop_words_as_strings(capsys, tiny_server, greedy, protocol):
    stop = greedy[0][len(greedy[0]) // 2 :].split()[0]
    rc, doc, err = client(
        capsys, tiny_server, protocol, "--json", "--max-tokens", "12", "--stop-words", stop, PROMPTS[0]
    )
    assert rc == 0, err
    text = doc["results"][0]["text"]
    assert stop not in text and greedy[0].startswith(text) and len(text) < len(greedy[0])


def test_openai_stop_and_chat(capsys, tiny_server, greedy):
    stop = greedy[0][len(greedy[0]) // 2 :].split()[0]
    rc, doc, _ = client(
        capsys, tiny_server, "openai", "--json", "--max-tokens", "12", "--stop-words", stop, PROMPTS[0]
    )
    result = doc["results"][0]
    assert rc == 0 and result["finish_reason"] == "stop" and stop not in result["text"]
    assert greedy[0].startswith(result["text"])

    rc, doc, _ = client(
        capsys, tiny_server, "openai", "--json", "--chat", "--stream", "--max-tokens", "5", "Hi"
    )
    assert rc == 0 and doc["results"][0]["num_tokens"] == 5 and doc["results"][0]["text"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_server_errors_reach_the_user(capsys, tiny_server, protocol):
    rc, out, err = client(capsys, tiny_server, protocol, "--top-p", "2", "--temperature", "1", "ok", "fine")
    assert rc == 1
    assert "2 requests, 2 failed" in out
    expected = "runtime_top_p" if protocol != "openai" else "top_p"
    assert err.count("gptserve client: error: prompt") == 2 and expected in err

    rc, _, err = client(capsys, tiny_server, protocol, "-m", "no-such-model", "hi")
    assert rc in (1, 2) and "no-such-model" in err


def test_context_overflow_message(capsys, tiny_server):
    rc, _, err = client(capsys, tiny_server, "openai", "--max-tokens", str(MAX_LEN + 1), "hi")
    assert rc == 1 and "maximum context length" in err


def test_usage_errors_exit_2(capsys, tiny_server):
    rc, _, err = client(capsys, tiny_server, "openai", "--beam-width", "2", "hi")
    assert rc == 2 and "beam search" in err
    rc, _, err = client(capsys, tiny_server, "http", "--chat", "hi")
    assert rc == 2 and "--chat needs --protocol openai" in err
    capsys.readouterr()
    assert main(["client", "-u", "http://127.0.0.1:9", "hi"]) == 2
    assert "cannot reach the server" in capsys.readouterr().err
