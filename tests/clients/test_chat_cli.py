"""`gptserve chat` in a pseudo-terminal, as a person types: answers stream in, Ctrl-C stops an answer
(and cancels it on the server) but not the program, /system, /reset and /history manage the
conversation, server errors are shown and the chat goes on, Ctrl-D quits with status 0. Once against
a server (`--url`), once with the embedded SmolLM2 loaded in the process."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx
import pexpect

from tests.server.conftest import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "\r\n> "


def spawn_chat(*args: str, timeout: float = 60) -> pexpect.spawn:
    child = pexpect.spawn(
        sys.executable, ["-m", "gptserve.cli", "--log-level", "warning", "chat", *args],
        cwd=str(ROOT), encoding="utf-8", timeout=timeout, dimensions=(40, 200),
    )  # fmt: skip
    child.expect("Chatting with ")
    child.expect(PROMPT)
    return child


def running_requests(server: ServerProcess) -> float:
    metrics = httpx.get(f"{server.url}/metrics").text
    line = next(m for m in metrics.splitlines() if m.startswith("vllm:num_requests_running"))
    return float(line.rsplit(" ", 1)[1])


def quit_chat(child: pexpect.spawn) -> None:
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_chat_with_a_server(tiny_server: ServerProcess):
    child = spawn_chat("--url", tiny_server.url, "--temperature", "0", "--max-tokens", "3000")
    child.sendline("Tell me a long story")
    child.expect_exact("Tell me a long story\r\n")  # the terminal's echo
    child.expect(r"\S{3}")  # the answer is streaming in
    child.sendintr()
    child.expect_exact(" [stopped]")
    child.expect(PROMPT)
    deadline = time.monotonic() + 10
    while running_requests(tiny_server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running_requests(tiny_server) == 0, "Ctrl-C should cancel the request on the server"

    child.sendline("/history")
    child.expect_exact("user: Tell me a long story")
    child.expect_exact("assistant: ")  # the part written before Ctrl-C stays in the conversation
    child.expect(PROMPT)
    child.sendline("/system Be brief.")
    child.expect_exact("(system prompt: Be brief.)")
    child.sendline("/reset")
    child.expect_exact("(conversation cleared)")
    child.sendline("/history")
    child.expect_exact("system: Be brief.")
    child.expect(PROMPT)
    assert "user:" not in child.before

    child.sendintr()  # at the prompt: no exit
    child.expect_exact("(Ctrl-D or /exit quits)")
    child.sendline("x " * 5000)  # far beyond the context: the server's message is shown, the chat goes on
    child.expect("error: HTTP 400: .*maximum context length")
    child.expect(PROMPT)
    child.sendline("/history")
    child.expect_exact("system: Be brief.")
    child.expect(PROMPT)
    assert "user:" not in child.before  # the failed turn was not kept
    quit_chat(child)


def test_chat_with_the_embedded_model():
    child = spawn_chat("--dtype", "fp32", "--temperature", "0", "--max-tokens", "400", timeout=180)
    child.sendline("/system You are a helpful assistant.")
    child.expect_exact("(system prompt: You are a helpful assistant.)")
    child.sendline("What is the capital of France? Answer in one word.")
    child.expect("Paris")
    child.expect(PROMPT)
    child.sendline("/reset")
    child.expect_exact("(conversation cleared)")
    child.expect(PROMPT)
    child.sendline("Count from 1 to 300, separated by commas.")
    child.expect_exact("separated by commas.\r\n")  # the terminal's echo
    child.expect(r"\d")
    child.sendintr()
    child.expect_exact(" [stopped]")
    child.expect(PROMPT)
    child.sendline("/history")
    child.expect_exact("system: You are a helpful assistant.")
    child.expect_exact("user: Count from 1 to 300")
    child.expect_exact("assistant: ")
    child.expect(PROMPT)
    assert "France" not in child.before
    quit_chat(child)
