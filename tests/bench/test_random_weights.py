"""Random-weight checkpoints: reproducible values, the engine and Hugging Face load the same model, and
`bench --random-weights` refuses tensor parallelism with the way round it."""

from __future__ import annotations

import torch

from gptserve import LLM, SamplingParams
from gptserve.bench.random_weights import hf_model_from_checkpoint, random_checkpoint
from gptserve.engine.builder import build_engine
from gptserve.engine.engine_options import EngineOptions
from tests.conftest import hf_greedy


def test_weights_repeat_across_passes():
    checkpoint = random_checkpoint("gptj-tiny", "cpu", torch.float32, seed=3)
    first, second = dict(checkpoint.weights()), dict(checkpoint.weights())
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    norm = first["transformer.ln_f.weight"]
    assert 0.9 < norm.mean().item() < 1.1


def test_engine_and_transformers_agree_on_random_weights():
    checkpoint = random_checkpoint("gptj-tiny", "cpu", torch.float32)
    engine = build_engine(
        "random:gptj-tiny", EngineOptions(device="cpu", dtype="fp32"), checkpoint=checkpoint
    )
    llm = LLM.from_engine(engine)
    hf_model = hf_model_from_checkpoint(checkpoint, torch.float32, "cpu")
    prompt = list(range(40, 60))
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    tokens, _ = hf_greedy(hf_model, prompt, 12)
    assert out[0].outputs[0].token_ids == tokens


def test_tensor_parallel_random_weights_are_refused_by_name(capsys):
    from gptserve.cli import main

    argv = [
        "bench",
        "latency",
        "--random-weights",
        "gptj-tiny",
        "--device",
        "cpu",
        "--tensor-parallel-size",
        "2",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--random-weights" in err and "--tensor-parallel-size 2" in err and "gptserve convert" in err
