"""Qwen2 (Qwen2.5) and Qwen3: full-sequence logits against transformers on the same random weights, and
the configs gptserve reads from them."""

from __future__ import annotations

import pytest
import torch

from gptserve.config import ModelConfig
from gptserve.models.qwen3 import Qwen3Attention
from gptserve.models.registry import model_class
from tests.tiny_qwen import build_tiny_qwen, qwen_hf_config

CASES = {
    "qwen2-gqa-tied": ("qwen2", {}),
    "qwen2-mha-untied": ("qwen2", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "qwen3-head-dim-32": ("qwen3", {}),
    "qwen3-head-dim-8-attention-bias": ("qwen3", dict(head_dim=8, attention_bias=True)),
}


def ours_loaded_from(hf: torch.nn.Module) -> torch.nn.Module:
    config = ModelConfig.from_hf(hf.config.to_dict())
    ours = model_class(config)(config).eval()
    ours.load_weights(hf.state_dict().items())
    return ours


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_fp32(case):
    arch, overrides = CASES[case]
    hf = build_tiny_qwen(arch, **overrides)
    ours = ours_loaded_from(hf)
    tokens = torch.randint(0, hf.config.vocab_size, (48,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens[None]).logits[0]
        actual = ours.compute_logits(ours(tokens, torch.arange(len(tokens))))
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_logits_match_transformers_bf16(arch):
    hf = build_tiny_qwen(arch)
    config = ModelConfig.from_hf(hf.config.to_dict())
    torch.set_default_dtype(torch.bfloat16)
    try:
        ours = model_class(config)(config).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    ours.load_weights(hf.state_dict().items())
    tokens = torch.randint(0, hf.config.vocab_size, (32,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        exact = hf(tokens[None]).logits[0]
        expected = hf.to(torch.bfloat16)(tokens[None]).logits[0].float()
        actual = ours.compute_logits(ours(tokens, torch.arange(len(tokens))))
    # The same operations in the same dtype, reductions ordered differently (attention kernels): ours
    # stays closer to transformers' bf16 logits than those are to the float32 ones.
    assert (actual - expected).abs().max() < (expected - exact).abs().max()


def test_qwen2_biases_q_k_v_only():
    config = ModelConfig.from_hf(qwen_hf_config("qwen2").to_dict())
    assert (config.architecture, config.qkv_bias, config.attention_bias) == ("qwen2", True, False)
    attn = model_class(config)(config).model.layers[0].self_attn
    assert attn.qkv_proj.bias is not None and attn.o_proj.bias is None


def test_qwen3_config_and_per_head_norms():
    config = ModelConfig.from_hf(qwen_hf_config("qwen3").to_dict())
    assert (config.architecture, config.head_dim, config.rotary_dim) == ("qwen3", 32, 32)
    assert not config.qkv_bias and config.rope_theta == 1000000.0
    attn = model_class(config)(config).model.layers[0].self_attn
    assert isinstance(attn, Qwen3Attention)
    assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (32,)
    assert attn.qkv_proj.bias is None and attn.o_proj.bias is None


@pytest.mark.parametrize(
    "overrides",
    [
        dict(use_sliding_window=False, sliding_window=32768, max_window_layers=1),  # as Qwen2.5 ships
        dict(use_sliding_window=True, sliding_window=64, max_window_layers=2),  # no layer from 2 on
    ],
    ids=["window-off", "no-sliding-layer"],
)
def test_configs_without_sliding_layers_load(overrides):
    config = qwen_hf_config("qwen2", **overrides).to_dict()
    loaded = ModelConfig.from_hf(config)
    assert loaded.num_layers == 2 and [loaded.sliding_window_for(i) for i in range(2)] == [None, None]
    config.pop("layer_types")
    loaded = ModelConfig.from_hf(config)
    assert loaded.num_layers == 2 and [loaded.sliding_window_for(i) for i in range(2)] == [None, None]
