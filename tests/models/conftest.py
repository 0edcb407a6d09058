"""Fixtures for model tests: a tiny random Hugging Face model of each architecture and ours loaded from it."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from gptserve.config import ModelConfig
from gptserve.models.registry import model_class
from tests.helpers import tiny_hf_config

# The model tests' shapes, over the shared table: a 256-token vocabulary, 128 positions, MLPs 96 wide
# (1.5x the hidden size) and a NeoX rotating a quarter of each head.
MODEL_SHAPES = dict(vocab_size=256, max_positions=128)
MODEL_ARCH_SHAPES = {
    "llama": dict(intermediate_size=96),
    "gpt_neox": dict(intermediate_size=96, rotary_pct=0.25),
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
    from transformers import AutoModelForCausalLM

    config = tiny_hf_config(arch, **{**MODEL_SHAPES, **MODEL_ARCH_SHAPES.get(arch, {}), **overrides})
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
