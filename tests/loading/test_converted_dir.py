"""gptserve's converted format: HF checkpoints of every architecture round-trip through TP=2 files."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from gptserve.cli import main
from gptserve.config import ModelConfig
from gptserve.llm import LLM
from gptserve.loading.loader import load_checkpoint
from gptserve.parallel.sharding import shard_hf_tensor
from gptserve.sampling_params import SamplingParams
from tests.conftest import ARCHS, hf_greedy

PROMPT = [5, 9, 33, 2, 7, 101, 250]
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
ENGINE = dict(device="cpu", dtype="fp32", num_kv_blocks=32, max_model_len=64, block_size=8)


@pytest.fixture(scope="module", params=ARCHS)
def converted(request, tiny_models, tmp_path_factory):
    """(HF dir, HF model, the HF dir converted for two ranks)."""
    source, model = tiny_models[request.param]
    dst = tmp_path_factory.mktemp(f"converted-{request.param}") / "tp2"
    assert main(["convert", str(source), str(dst), "--tensor-parallel-size", "2"]) == 0
    return source, model, dst


def test_full_weights_round_trip_exactly(converted):
    source, _, dst = converted
    expected = dict(load_checkpoint(source).weights())
    got = dict(load_checkpoint(dst).weights())
    assert sorted(got) == sorted(expected)
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)


def test_rank_files_hold_megatron_slices(converted):
    source, _, dst = converted
    checkpoint = load_checkpoint(dst)
    config = ModelConfig.from_hf(checkpoint.hf_config)
    full = dict(load_checkpoint(source).weights())
    for rank in range(2):
        with safe_open(str(dst / f"model-rank-{rank}-of-2.safetensors"), framework="pt") as f:
            stored = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        from_reader = dict(checkpoint.weights_for_rank(rank, 2))
        assert sorted(stored) == sorted(full) == sorted(from_reader)
        for name, tensor in full.items():
            expected = shard_hf_tensor(config, name, tensor, rank, 2)
            torch.testing.assert_close(stored[name], expected, rtol=0, atol=0, msg=name)
            torch.testing.assert_close(from_reader[name], expected, rtol=0, atol=0, msg=name)


def test_reconvert_to_one_rank_in_bf16(converted, tmp_path):
    source, _, dst = converted
    again = tmp_path / "tp1-bf16"
    assert main(["convert", str(dst), str(again), "--dtype", "bf16"]) == 0
    checkpoint = load_checkpoint(again)
    assert checkpoint.tensor_parallel_size == 1
    expected = dict(load_checkpoint(source).weights())
    for name, tensor in checkpoint.weights():
        assert tensor.dtype == torch.bfloat16, name
        torch.testing.assert_close(tensor, expected[name].to(torch.bfloat16), rtol=0, atol=0, msg=name)


def test_serves_hf_greedy(converted):
    _, model, dst = converted
    llm = LLM(str(dst), **ENGINE)
    try:
        got = list(llm.generate([PROMPT], GREEDY)[0].outputs[0].token_ids)
    finally:
        llm.close()
    assert got == hf_greedy(model, PROMPT, GREEDY.max_tokens)[0]
