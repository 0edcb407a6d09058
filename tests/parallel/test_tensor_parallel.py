"""Tensor parallelism end to end on CPU (gloo, two ranks): `LLM(path, tensor_parallel_size=2)` spawns one
worker and must generate what one rank generates."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gptserve.cli import main
from gptserve.engine.tp_launcher import current_world
from gptserve.llm import LLM
from gptserve.outputs import CompletionOutput
from gptserve.sampling_params import SamplingParams
from tests.conftest import ARCHS, process_running, random_prompts
from tests.helpers import free_port
from tests.parallel.conftest import ODD_VOCAB

ENGINE = dict(device="cpu", dtype="fp32", num_kv_blocks=64, max_model_len=128, block_size=8)
PROMPTS = random_prompts(3, ODD_VOCAB, [5, 11, 19], seed=1)
GREEDY = SamplingParams(max_tokens=16, temperature=0, logprobs=5)
REPO = Path(__file__).resolve().parents[2]


def generate(path: Path, **options) -> list[CompletionOutput]:
    llm = LLM(path, **ENGINE, **options)
    try:
        return [out.outputs[0] for out in llm.generate(PROMPTS, GREEDY)]
    finally:
        llm.close()


def assert_close_logprobs(ref: list[CompletionOutput], got: list[CompletionOutput], atol: float) -> None:
    for a, b in zip(ref, got):
        for x, y in zip(a.logprobs, b.logprobs):
            assert [t for t, _ in x.top] == [t for t, _ in y.top]
            assert max(abs(p - q) for (_, p), (_, q) in zip(x.top, y.top)) <= atol


@pytest.mark.parametrize("arch", ARCHS)
def test_tp2_equals_tp1(odd_vocab_models, arch):
    path = odd_vocab_models[arch]
    ref = generate(path)
    got = generate(path, tensor_parallel_size=2)
    assert current_world() is None  # closed: no worker left behind
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    assert_close_logprobs(ref, got, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gptj"])  # gptj: quantized layers with a deferred reduction
def test_int8_under_tp2_agrees_with_int8_tp1(odd_vocab_models, arch):
    path = odd_vocab_models[arch]
    ref = generate(path, quantization="int8")
    got = generate(path, tensor_parallel_size=2, quantization="int8")
    # Row-parallel layers quantize each rank's input half with its own per-channel scales, so the two
    # differ by rounding only: the first token and its distribution agree closely.
    assert [o.token_ids[0] for o in got] == [o.token_ids[0] for o in ref]
    for a, b in zip(ref, got):
        first_ref, first_got = dict(a.logprobs[0].top), dict(b.logprobs[0].top)
        common = first_ref.keys() & first_got.keys()
        assert len(common) >= 4
        assert max(abs(first_ref[t] - first_got[t]) for t in common) < 0.05


def test_heads_not_divisible_exits_nonzero_naming_the_number(odd_vocab_models, capsys):
    args = ["generate", str(odd_vocab_models["gpt2"]), "--device", "cpu", "-p", "1 2 3"]
    assert main([*args, "--tensor-parallel-size", "3"]) != 0
    err = capsys.readouterr().err
    assert "4 attention heads" in err and "tensor_parallel_size 3" in err
    assert current_world() is None


def run_script(code: str, path: Path, timeout: int = 120, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), str(path)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_dead_worker_fails_rank0_loudly(odd_vocab_models):
    code = f"""
        import os, signal, sys, time
        from gptserve.llm import LLM
        from gptserve.engine.tp_launcher import current_world
        llm = LLM(sys.argv[1], tensor_parallel_size=2, **{ENGINE!r})
        os.kill(current_world().workers[0].pid, signal.SIGKILL)
        time.sleep(1)
        llm.generate([[1, 2, 3]])
        time.sleep(30)
        """
    proc = run_script(code, odd_vocab_models["gpt2"])
    assert proc.returncode != 0
    assert f"exited with code -{signal.SIGKILL.value}" in proc.stderr or "Connection" in proc.stderr


def test_torchrun_world(odd_vocab_models, tmp_path):
    """Under torchrun every rank runs the same program: rank 0 generates, the others serve its steps."""
    script = tmp_path / "run.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys
        from gptserve.llm import LLM
        from gptserve.sampling_params import SamplingParams
        llm = LLM(sys.argv[1], **{ENGINE!r})  # ranks other than 0 serve steps in here, then exit
        out = llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=4))
        print("TOKENS", out[0].outputs[0].token_ids)
        llm.close()
        """)
    )
    port = str(free_port())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port]
    proc = subprocess.run(
        [*cmd, str(script), str(odd_vocab_models["gpt2"])],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("TOKENS") == 1


def test_worker_leaves_when_rank0_is_killed(odd_vocab_models):
    """A worker waiting on the step channel notices that rank 0's process is gone and exits by itself."""
    code = f"""
        import sys, time
        from gptserve.llm import LLM
        from gptserve.engine.tp_launcher import current_world
        llm = LLM(sys.argv[1], tensor_parallel_size=2, **{ENGINE!r})
        llm.generate([[1, 2, 3]])
        print("WORKER", current_world().workers[0].pid, flush=True)
        time.sleep(120)
        """
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), str(odd_vocab_models["gpt2"])],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("WORKER"), line
        worker = int(line.split()[1])
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 10
        while process_running(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not process_running(worker)
    finally:
        proc.kill()
        proc.wait()


def test_async_scheduling_under_tp2(odd_vocab_models):
    """Steps launched ahead under tensor parallelism: rank 0's sampled tokens reach the worker through a
    broadcast inside the step; two ranks generate what one rank generates synchronously."""
    path = odd_vocab_models["gptj"]
    params = [
        SamplingParams(max_tokens=16, temperature=0, logprobs=5),
        SamplingParams(max_tokens=11, temperature=0.8, seed=5),
        SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
    ]
    one = LLM(path, **ENGINE)
    ref = [o.outputs[0] for o in one.generate(PROMPTS, params)]
    one.close()
    two = LLM(path, tensor_parallel_size=2, async_scheduling=True, **ENGINE)
    try:
        got = [o.outputs[0] for o in two.generate(PROMPTS, params)]
        assert two.engine.core.num_steps_ahead > 0
        assert two.engine.core.kv.num_free_blocks == two.engine.core.kv.num_blocks
    finally:
        two.close()
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    assert_close_logprobs(ref[:1], got[:1], atol=1e-4)
