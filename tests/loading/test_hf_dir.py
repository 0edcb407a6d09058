"""Hugging Face directories: weights in every layout equal the model's state dict; config and tokenizer."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from gptserve.config import ModelConfig
from gptserve.loading.hf_dir import hf_weight_name
from gptserve.loading.loader import load_checkpoint

from .tiny_models import LAYOUTS, add_bpe_files, expected_weights, tiny_config

HELLO_WORLD_GPT2_IDS = [15496, 11, 995, 0]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_weights_round_trip(tiny_model, layout):
    model, directories = tiny_model
    checkpoint = load_checkpoint(directories[layout])

    stream = checkpoint.weights()
    assert inspect.isgenerator(stream)
    loaded = dict(stream)
    expected = expected_weights(model)
    assert sorted(loaded) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name
    # A second pass re-reads the files.
    assert sorted(name for name, _ in checkpoint.weights()) == sorted(expected)

    sharded = layout.startswith("sharded")
    assert checkpoint.source.startswith(f"hf {'bin' if 'bin' in layout else 'safetensors'}")
    assert ("shards" in checkpoint.source) == sharded
    assert checkpoint.tokenizer is None and checkpoint.chat_template is None


def test_config_read(tiny_model):
    model, directories = tiny_model
    checkpoint = load_checkpoint(str(directories["safetensors"]))
    assert checkpoint.hf_config["model_type"] == model.config.model_type
    config = ModelConfig.from_hf(checkpoint.hf_config)
    assert (config.hidden_size, config.num_layers, config.num_heads) == (64, 2, 4)
    assert config.vocab_size == 96
    assert config.tie_word_embeddings == model.config.tie_word_embeddings


def test_legacy_names_are_normalised(tmp_path):
    """The original GPT-2 checkpoints: no `transformer.` prefix, attention-mask buffers saved as weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("gpt2"))
    expected = expected_weights(model)
    legacy = {name.removeprefix("transformer."): tensor.clone() for name, tensor in expected.items()}
    for layer in range(2):
        legacy[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(1, 1, 128, 128))
        legacy[f"h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    model.config.save_pretrained(tmp_path)
    torch.save(legacy, tmp_path / "pytorch_model.bin")

    loaded = dict(load_checkpoint(tmp_path).weights())
    assert sorted(loaded) == sorted(expected)
    assert all(torch.equal(loaded[name], tensor) for name, tensor in expected.items())


@pytest.mark.parametrize(
    ("model_type", "stored", "tied", "expected"),
    [
        ("gpt_neox", "embed_out.weight", False, "lm_head.weight"),
        ("gpt_neox", "gpt_neox.layers.0.attention.bias", False, None),
        (
            "gpt_neox",
            "gpt_neox.layers.0.attention.dense.bias",
            False,
            "gpt_neox.layers.0.attention.dense.bias",
        ),
        ("gptj", "transformer.h.0.attn.masked_bias", False, None),
        ("llama", "model.layers.0.self_attn.rotary_emb.inv_freq", False, None),
        ("llama", "lm_head.weight", True, None),
        ("llama", "lm_head.weight", False, "lm_head.weight"),
        ("gpt2", "h.0.attn.c_attn.bias", True, "transformer.h.0.attn.c_attn.bias"),
    ],
)
def test_hf_weight_name(model_type, stored, tied, expected):
    assert hf_weight_name(model_type, stored, tied) == expected


def test_bpe_tokenizer_and_chat_template(tiny_model, gpt2_vocab_files, tmp_path):
    """vocab.json + merges.txt read for every architecture (Llama's own class needs tokenizer.json)."""
    model, _ = tiny_model
    model.save_pretrained(tmp_path)
    add_bpe_files(tmp_path, gpt2_vocab_files)
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))

    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.tokenizer is not None
    assert checkpoint.tokenizer("Hello, world!").input_ids == HELLO_WORLD_GPT2_IDS
    assert checkpoint.tokenizer.decode(HELLO_WORLD_GPT2_IDS) == "Hello, world!"
    assert checkpoint.chat_template == template


def test_tokenizer_json_and_jinja_template(tmp_path, gpt2_vocab_files):
    from transformers import AutoModelForCausalLM, GPT2Tokenizer

    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(tmp_path)
    bpe_dir = tmp_path / "bpe"
    bpe_dir.mkdir()
    add_bpe_files(bpe_dir, gpt2_vocab_files)
    GPT2Tokenizer.from_pretrained(str(bpe_dir)).save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "from tokenizer_config"}))
    (tmp_path / "chat_template.jinja").write_text("from chat_template.jinja")

    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.tokenizer("Hello, world!").input_ids == HELLO_WORLD_GPT2_IDS
    assert checkpoint.chat_template == "from chat_template.jinja"
