"""Fixtures for model tests: a tiny random Hugging Face model of each architecture and ours loaded from it."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from gptserve.config import ModelConfig
from gptserve.models.registry import model_class

BASE_CONFIGS = {
    "llama": dict(
        model_type="llama",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    ),
    "gptj": dict(
        model_type="gptj", vocab_size=256, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=128
    ),
    "gpt_neox": dict(
        model_type="gpt_neox",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        rotary_pct=0.25,
        max_position_embeddings=128,
    ),
    "gpt2": dict(model_type="gpt2", vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128),
}


def randomize_(model: nn.Module, seed: int = 0) -> None:
    """Every parameter random, biases and norm scales included, so a misplaced tensor changes the output.

    The scale makes attention far from uniform, so position handling shows in the logits.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            is_norm_scale = p.dim() == 1 and name.endswith("weight")
            p.copy_(noise + 1.0 if is_norm_scale else noise)


def hf_model(arch: str, **overrides) -> tuple[nn.Module, dict]:
    """A tiny random fp32 Hugging Face model in eval mode and its config.json dictionary."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {**BASE_CONFIGS[arch], **overrides}
    config = AutoConfig.for_model(kwargs.pop("model_type"), bos_token_id=None, eos_token_id=None, **kwargs)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    randomize_(model)
    return model, config.to_dict()


def our_model(hf_config: dict, dtype: torch.dtype = torch.float32) -> nn.Module:
    config = ModelConfig.from_hf(hf_config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return model_class(config)(config).eval()
    finally:
        torch.set_default_dtype(previous)


@pytest.fixture
def build_pair() -> Callable[..., tuple[nn.Module, nn.Module]]:
    """build_pair(arch, dtype=fp32, **hf_overrides) -> (HF model, our model loaded from its state dict)."""

    def build(arch: str, dtype: torch.dtype = torch.float32, **overrides) -> tuple[nn.Module, nn.Module]:
        hf, cfg = hf_model(arch, **overrides)
        ours = our_model(cfg, dtype)
        ours.load_weights(hf.state_dict().items())
        return hf, ours

    return build


@pytest.fixture
def tiny_hf() -> Callable[..., tuple[nn.Module, dict]]:
    """tiny_hf(arch, **overrides) -> (HF model, config.json dictionary)."""
    return hf_model


@pytest.fixture
def new_model() -> Callable[..., nn.Module]:
    """new_model(config.json dictionary, dtype=fp32) -> our model, weights not yet loaded."""
    return our_model
