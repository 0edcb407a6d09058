"""The GEMM shapes `gptserve tune` times: one rank's linear layers of each architecture, built on the meta
device, and the row counts of decode and prompt steps; `tune` refuses to run without a GPU."""

from __future__ import annotations

import pytest
import torch

from gptserve.bench.random_weights import RANDOM_MODELS
from gptserve.cli import main
from gptserve.config import ModelConfig
from gptserve.layers.tuning_file import load_tuning
from gptserve.parallel import parallel_state
from gptserve.tuning.gemm_shapes import GemmShape, decode_row_counts, model_gemm_shapes, prefill_row_counts

GPTJ_6B = ModelConfig.from_hf(RANDOM_MODELS["gptj-6b"])


def test_gptj_6b_shapes_on_one_and_two_ranks():
    assert model_gemm_shapes(GPTJ_6B, 1) == [
        GemmShape("qkv_proj", 12288, 4096, False, 28),
        GemmShape("out_proj", 4096, 4096, False, 28),
        GemmShape("fc_in", 16384, 4096, False, 28),  # the MLP's biases: added by the fused kernels
        GemmShape("fc_out", 4096, 16384, False, 28),
        GemmShape("lm_head", 50400, 4096, True, 1),
    ]
    # Column-parallel layers split n, row-parallel ones k.
    assert model_gemm_shapes(GPTJ_6B, 2) == [
        GemmShape("qkv_proj", 6144, 4096, False, 28),
        GemmShape("out_proj", 4096, 2048, False, 28),
        GemmShape("fc_in", 8192, 4096, False, 28),
        GemmShape("fc_out", 4096, 8192, False, 28),
        GemmShape("lm_head", 25200, 4096, True, 1),
    ]
    assert parallel_state.world_size() == 1  # the assumed world is gone again


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "gpt2"])
def test_every_architecture_lists_its_projections_and_head(arch, tiny_models):
    from gptserve.loading.loader import load_checkpoint

    path, hf_model = tiny_models[arch]
    config = ModelConfig.from_hf(load_checkpoint(path).hf_config)
    shapes = model_gemm_shapes(config, 1)
    params = sum(s.n * s.k * s.layers for s in shapes)
    hf_params = sum(m.weight.numel() for m in hf_model.modules() if type(m).__name__ in ("Linear", "Conv1D"))
    head = next(s for s in shapes if s.name == "lm_head")
    assert (head.n, head.k) == (config.vocab_size, config.hidden_size)
    if config.tie_word_embeddings:  # HF's tied head is a Linear sharing the embedding: counted the same
        assert params == hf_params or params == hf_params + head.n * head.k
    else:
        assert params == hf_params


def test_row_counts():
    assert decode_row_counts(64) == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert decode_row_counts(100, [1, 8]) == [1, 8, 100]
    assert prefill_row_counts(128, 8192) == [32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
    assert prefill_row_counts(100, 2048) == [32, 64, 128, 256, 512, 1024, 2048]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_tune_without_a_gpu_says_so(tmp_path, capsys):
    assert main(["tune", str(tmp_path)]) == 2
    assert "tune needs a CUDA device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert load_tuning(tmp_path, torch.device("cpu")) is False


@pytest.mark.parametrize(
    ("value", "message"), [("1,x", "must be integers separated by commas"), ("4,0", "must be positive")]
)
def test_tune_refuses_bad_batch_sizes(tmp_path, capsys, value, message):
    assert main(["tune", str(tmp_path), "--batch-sizes", value]) == 2
    assert f"--batch-sizes {message}" in capsys.readouterr().err
