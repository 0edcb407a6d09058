"""Qwen2/Qwen3 with use_sliding_window (the window on the layers transformers marks sliding_attention) and
Mixtral (the window on every layer): the window each layer's attention gets, and fp32 logits of a sequence
three windows long against transformers' eager attention on the same random weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gptserve.config import ModelConfig
from gptserve.models.registry import model_class
from tests.tiny_moe import build_tiny_moe, checkpoint_weights, moe_hf_config
from tests.tiny_qwen import build_tiny_qwen, qwen_hf_config

WINDOW = 16
# max_window_layers=1: layer 0 attends to the whole context, layer 1 (and on) within the window.
QWEN_WINDOW = dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)


def layer_windows(config: ModelConfig) -> list[int | None]:
    model = model_class(config)(config)
    return [attn.sliding_window for attn in model.attention_layers()]


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_window_reaches_the_sliding_layers_only(arch):
    config = qwen_hf_config(arch, **QWEN_WINDOW).to_dict()
    assert layer_windows(ModelConfig.from_hf(config)) == [None, WINDOW]
    config.pop("layer_types")  # as configs older than transformers' layer_types have it
    assert layer_windows(ModelConfig.from_hf(config)) == [None, WINDOW]
    off = qwen_hf_config(arch, **dict(QWEN_WINDOW, use_sliding_window=False)).to_dict()
    assert layer_windows(ModelConfig.from_hf(off)) == [None, None]


def test_mixtral_and_qwen3_moe_windows_cover_every_layer_without_capping_the_context():
    mixtral = ModelConfig.from_hf(moe_hf_config("mixtral", sliding_window=WINDOW).to_dict())
    assert mixtral.max_position_embeddings == 256 and layer_windows(mixtral) == [WINDOW, WINDOW]
    qwen = moe_hf_config("qwen3_moe", use_sliding_window=True, sliding_window=WINDOW).to_dict()
    assert layer_windows(ModelConfig.from_hf(qwen)) == [WINDOW, WINDOW]
    qwen_off = moe_hf_config("qwen3_moe", use_sliding_window=False, sliding_window=WINDOW).to_dict()
    assert layer_windows(ModelConfig.from_hf(qwen_off)) == [None, None]


def build(arch: str, window: bool, path: Path | None = None) -> torch.nn.Module:
    if arch == "mixtral":
        overrides = dict(sliding_window=WINDOW if window else None, attn_implementation="eager")
        return build_tiny_moe(arch, path, **overrides)
    overrides = dict(QWEN_WINDOW, use_sliding_window=window, attn_implementation="eager")
    return build_tiny_qwen(arch, path, **overrides)


@pytest.mark.parametrize("arch", ["qwen2", "mixtral"])
def test_logits_past_the_window_match_transformers_fp32(arch, tmp_path):
    hf = build(arch, window=True, path=tmp_path)
    config = ModelConfig.from_hf(hf.config.to_dict())
    ours = model_class(config)(config).eval()
    ours.load_weights(checkpoint_weights(tmp_path).items())  # Mixtral's experts as stored, one by one
    tokens = torch.randint(0, hf.config.vocab_size, (3 * WINDOW,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens[None]).logits[0]
        actual = ours.compute_logits(ours(tokens, torch.arange(len(tokens))))
        hf_whole = build(arch, window=False)(tokens[None]).logits[0]
    assert (actual - expected).abs().max().item() < 1e-4
    assert (hf_whole - expected)[WINDOW:].abs().max().item() > 1e-2  # the window changes the logits
