"""`gptserve serve --tensor-parallel-size 2` on CPU (gloo, one spawned worker fed through the shared-memory
step channel): the server answers the openai SDK with what one rank generates, and SIGTERM takes the worker
down with it."""

from __future__ import annotations

from pathlib import Path

import openai

from gptserve.llm import LLM
from gptserve.sampling_params import SamplingParams
from tests.conftest import process_running
from tests.server.conftest import start_tiny_gptj_server

TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"


def _spawned_children(pid: int) -> list[int]:
    """Processes `pid` started with multiprocessing's spawn method (not its resource tracker)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        children = [int(p) for p in f.read().split()]
    return [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def test_two_ranks_serve_what_one_generates(tmp_path: Path, tiny_gptj_tokenized: Path):
    tp = ("--device", "cpu", "--tensor-parallel-size", "2")
    server = start_tiny_gptj_server(tiny_gptj_tokenized, tmp_path, "tiny-tp", 256, TEMPLATE, *tp)
    try:
        workers = _spawned_children(server.process.pid)
        assert workers, "the server spawned no tensor-parallel worker"
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        prompts = ["The quick brown fox", "Once upon a time there", "1, 2, 3,"]
        got = [
            client.completions.create(model="tiny-tp", prompt=p, max_tokens=12, temperature=0).choices[0].text
            for p in prompts
        ]
    finally:
        assert server.stop() == 0
    one_rank = LLM(str(tiny_gptj_tokenized), device="cpu", dtype="fp32", max_model_len=256)
    greedy = SamplingParams(max_tokens=12, temperature=0)
    assert got == [o.outputs[0].text for o in one_rank.generate(prompts, greedy)]
    assert not any(process_running(p) for p in workers)
