"""Paths that are not readable models fail with a ModelLoadError naming the file or field at fault."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gptserve.errors import ModelLoadError
from gptserve.loading.loader import load_checkpoint

from .tiny_models import save_layout, tiny_config, write_gguf


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def test_directory_without_config(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="without config.json.*model.gguf"):
        load_checkpoint(tmp_path)


def test_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "weights.txt"
    path.write_text("hello")
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        load_checkpoint(path)


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ModelLoadError, match="bert"):
        load_checkpoint(tmp_path)


def test_config_without_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(ModelLoadError, match="model_type"):
        load_checkpoint(tmp_path)


def test_config_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_checkpoint(tmp_path)


def test_no_weight_files(tmp_path):
    tiny_config("gpt2").save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="no weights"):
        load_checkpoint(tmp_path)


def test_index_names_missing_shard(sharded_llama_dir):
    shard = sorted(sharded_llama_dir.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=shard.name):
        load_checkpoint(sharded_llama_dir)


def test_truncated_safetensors(sharded_llama_dir):
    shard = sorted(sharded_llama_dir.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(ModelLoadError, match=shard.name):
        load_checkpoint(sharded_llama_dir)


def test_truncated_bin(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config("gptj"))
    save_layout(model, tmp_path / "gptj", "bin")
    weights = tmp_path / "gptj" / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match="pytorch_model.bin"):
        load_checkpoint(tmp_path / "gptj")


def test_bin_that_is_not_a_state_dict(tmp_path):
    tiny_config("gpt2").save_pretrained(tmp_path)
    torch.save([torch.zeros(2)], tmp_path / "pytorch_model.bin")
    checkpoint = load_checkpoint(tmp_path)
    with pytest.raises(ModelLoadError, match="pytorch_model.bin"):
        list(checkpoint.weights())


def test_truncated_gguf(tmp_path, smollm2_path):
    path = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as f:
        path.write_bytes(f.read(50_000_000))
    with pytest.raises(ModelLoadError, match="cut.gguf"):
        load_checkpoint(path)


def test_gguf_that_is_not_gguf(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"definitely not a gguf file")
    with pytest.raises(ModelLoadError, match="fake.gguf"):
        load_checkpoint(path)


def test_gguf_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", "gpt2", {"token_embd.weight": np.zeros((4, 8), np.float32)})
    with pytest.raises(ModelLoadError, match="'gpt2'"):
        load_checkpoint(path)


def test_gguf_unsupported_tensor_type(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", "llama", {"token_embd.weight": np.zeros((4, 8), np.float64)})
    with pytest.raises(ModelLoadError, match="F64"):
        load_checkpoint(path)


def test_gguf_unknown_tensor(tmp_path):
    tensors = {"token_embd.weight": np.zeros((4, 8), np.float32), "rope_freqs.weight": np.ones(2, np.float32)}
    path = write_gguf(tmp_path / "m.gguf", "llama", tensors)
    with pytest.raises(ModelLoadError, match="rope_freqs.weight"):
        load_checkpoint(path)
