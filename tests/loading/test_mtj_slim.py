"""mesh-transformer-jax slim checkpoints: read, converted (TP 1 and 2) and served, against Hugging Face."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gptserve.cli import main
from gptserve.llm import LLM
from gptserve.loading.loader import load_checkpoint
from gptserve.sampling_params import SamplingParams
from tests.conftest import hf_greedy

from .checkpoint_writers import mtj_config, tiny_gptj, write_mtj_slim

PROMPT = [5, 9, 33, 2, 7, 101, 250]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
ENGINE = dict(device="cpu", dtype="fp32", num_kv_blocks=32, max_model_len=64, block_size=8)


@pytest.fixture(scope="module", params=[2, 8], ids=["2-shards", "8-shards"])
def slim(request, tmp_path_factory):
    """(HF reference model, slim checkpoint dir, HF greedy tokens)."""
    root = tmp_path_factory.mktemp(f"slim{request.param}")
    model = tiny_gptj(root / "hf")
    directory = write_mtj_slim(model, root / "step_383500", shards=request.param)
    return model, directory, hf_greedy(model, PROMPT, GREEDY.max_tokens)[0]


def greedy(path, **options) -> list[int]:
    llm = LLM(str(path), **ENGINE, **options)
    try:
        return list(llm.generate([PROMPT], GREEDY)[0].outputs[0].token_ids)
    finally:
        llm.close()


def test_layout_is_the_slim_one(slim):
    _, directory, _ = slim
    shards = sorted(p.name for p in directory.glob("shard_*"))
    assert len(shards) in (2, 8)
    with np.load(directory / "shard_0" / "0.npz") as piece:
        assert piece["arr_0"].dtype == np.dtype("V2")  # bf16 as numpy stores it
    assert sorted(int(p.stem) for p in (directory / "shard_1").glob("*.npz")) == list(range(16))


def test_weights_equal_hf(slim):
    model, directory, _ = slim
    checkpoint = load_checkpoint(directory)
    got = dict(checkpoint.weights())
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith(("attn.bias", "masked_bias"))}
    assert sorted(got) == sorted(expected)
    for name, tensor in got.items():
        assert tensor.dtype == torch.bfloat16, name
        torch.testing.assert_close(tensor.float(), expected[name], rtol=0, atol=0, msg=name)
    assert checkpoint.hf_config["n_head"] == model.config.n_head


@pytest.mark.parametrize("tp", [1, 2])
def test_convert_then_serve_gives_hf_greedy(slim, tmp_path, tp):
    _, directory, expected = slim
    dst = tmp_path / f"gptj-tp{tp}"
    assert main(["convert", str(directory), str(dst), "--tensor-parallel-size", str(tp)]) == 0
    assert sorted(p.name for p in dst.glob("*.safetensors")) == [
        f"model-rank-{r}-of-{tp}.safetensors" for r in range(tp)
    ]
    section = json.loads((dst / "config.json").read_text())["gptserve"]
    assert section == {"format_version": 1, "tensor_parallel_size": tp, "dtype": "bf16", "quantization": None}
    assert greedy(dst) == expected


def test_config_file_flag(slim, tmp_path):
    model, directory, expected = slim
    shards = len(list(directory.glob("shard_*")))
    bare = write_mtj_slim(tiny_gptj(tmp_path / "hf"), tmp_path / "bare", shards, write_config=False)
    config = tmp_path / "gptj-tiny.json"
    config.write_text(json.dumps(mtj_config(model, shards)))
    dst = tmp_path / "converted"
    assert main(["convert", str(bare), str(dst), "--config", str(config)]) == 0
    assert greedy(dst) == expected


def test_tp2_runtime_reads_rank_files(slim, tmp_path):
    _, directory, expected = slim
    if len(list(directory.glob("shard_*"))) != 2:
        pytest.skip("one shard count is enough for the two-process run")
    dst = tmp_path / "gptj-tp2"
    assert main(["convert", str(directory), str(dst), "--tensor-parallel-size", "2"]) == 0
    assert greedy(dst, tensor_parallel_size=2) == expected
