"""Mistral (Llama's layers with a sliding window) against transformers' eager attention on the same
random weights: fp32 logits of a sequence three windows long, and the window's place in the config."""

from __future__ import annotations

import torch

from gptserve.config import ModelConfig
from gptserve.models.registry import model_class
from tests.tiny_mistral import WINDOW, build_tiny_mistral


def our_mistral(hf_model: torch.nn.Module) -> torch.nn.Module:
    config = ModelConfig.from_hf(hf_model.config.to_dict())
    model = model_class(config)(config).eval()
    model.load_weights(hf_model.state_dict().items())
    return model


def test_config_carries_the_window():
    config = ModelConfig.from_hf(build_tiny_mistral().config.to_dict())
    assert config.architecture == "llama" and config.sliding_window == WINDOW


def test_logits_past_the_window_match_transformers_fp32():
    hf = build_tiny_mistral()
    ours = our_mistral(hf)
    tokens = torch.randint(0, hf.config.vocab_size, (3 * WINDOW,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens[None]).logits[0]
        actual = ours.compute_logits(ours(tokens, torch.arange(len(tokens))))
        hf_whole = build_tiny_mistral(sliding_window=None)(tokens[None]).logits[0]
    assert (actual - expected).abs().max().item() < 1e-4
    assert (hf_whole - expected)[WINDOW:].abs().max().item() > 1e-2  # the window changes the logits
