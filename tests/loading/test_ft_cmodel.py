"""FasterTransformer c-model directories: read whole or per rank, loaded and converted, against HF."""

from __future__ import annotations

import pytest
import torch

from gptserve.cli import main
from gptserve.config import ModelConfig
from gptserve.llm import LLM
from gptserve.loading.loader import load_checkpoint
from gptserve.parallel.sharding import shard_hf_tensor
from gptserve.sampling_params import SamplingParams
from tests.conftest import hf_greedy

from .checkpoint_writers import tiny_gptj, write_ft_cmodel

PROMPT = [5, 9, 33, 2, 7, 101, 250]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
ENGINE = dict(device="cpu", dtype="fp32", num_kv_blocks=32, max_model_len=64, block_size=8)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    model = tiny_gptj(tmp_path_factory.mktemp("hf"))
    weights = {k: v for k, v in model.state_dict().items() if not k.endswith(("attn.bias", "masked_bias"))}
    return model, weights, hf_greedy(model, PROMPT, GREEDY.max_tokens)[0]


@pytest.fixture(scope="module", params=[1, 2], ids=["1-gpu", "2-gpu"])
def cmodel(request, reference, tmp_path_factory):
    n = request.param
    return n, write_ft_cmodel(reference[0], tmp_path_factory.mktemp("c-model") / f"{n}-gpu", n)


def greedy(path) -> list[int]:
    llm = LLM(str(path), **ENGINE)
    try:
        return list(llm.generate([PROMPT], GREEDY)[0].outputs[0].token_ids)
    finally:
        llm.close()


def test_merged_weights_equal_hf(cmodel, reference):
    n, directory = cmodel
    checkpoint = load_checkpoint(directory)
    assert checkpoint.tensor_parallel_size == n
    got = dict(checkpoint.weights())
    assert sorted(got) == sorted(reference[1])
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, reference[1][name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("world", [1, 2])
def test_rank_weights_are_megatron_slices(cmodel, reference, world):
    _, directory = cmodel
    checkpoint = load_checkpoint(directory)
    config = ModelConfig.from_hf(checkpoint.hf_config)
    for rank in range(world):
        got = dict(checkpoint.weights_for_rank(rank, world))
        for name, full in reference[1].items():
            expected = shard_hf_tensor(config, name, full, rank, world)
            torch.testing.assert_close(got[name], expected, rtol=0, atol=0, msg=f"{name} rank {rank}")


def test_loads_directly_with_hf_greedy(cmodel, reference):
    assert greedy(cmodel[1]) == reference[2]


def test_converts_to_tp2_with_hf_greedy(cmodel, reference, tmp_path):
    dst = tmp_path / "converted"
    assert main(["convert", str(cmodel[1]), str(dst), "--tensor-parallel-size", "2", "--dtype", "fp32"]) == 0
    assert greedy(dst) == reference[2]
