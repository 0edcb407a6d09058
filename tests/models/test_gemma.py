"""Gemma 2 and Gemma 3 (text): full-sequence logits against transformers (eager attention) on the same
random weights, and the configs gptserve reads from them."""

from __future__ import annotations

import pytest
import torch

from gptserve.config import ModelConfig
from gptserve.models.registry import model_class
from tests.tiny_gemma import build_tiny_gemma, gemma_hf_config

CASES = {
    "gemma2-softcaps": ("gemma2", {}),
    "gemma2-mha-untied": ("gemma2", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "gemma3-local-rope-linear-global": ("gemma3", {}),
    "gemma3-final-softcap-3-layers": ("gemma3", dict(num_hidden_layers=3, final_logit_softcapping=3.0)),
    "gemma2-window-16": ("gemma2", dict(sliding_window=16)),  # 48 tokens: the local layers slide
    "gemma3-window-16": ("gemma3", dict(sliding_window=16)),
}


def ours_loaded_from(hf: torch.nn.Module) -> torch.nn.Module:
    config = ModelConfig.from_hf(hf.config.to_dict())
    ours = model_class(config)(config).eval()
    ours.load_weights(hf.state_dict().items())
    return ours


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_fp32(case):
    arch, overrides = CASES[case]
    hf = build_tiny_gemma(arch, **overrides)
    ours = ours_loaded_from(hf)
    tokens = torch.randint(0, hf.config.vocab_size, (48,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens[None]).logits[0]
        actual = ours.compute_logits(ours(tokens, torch.arange(len(tokens))))
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() < 1e-4


def test_gemma2_config():
    config = ModelConfig.from_hf(gemma_hf_config("gemma2").to_dict())
    assert config.architecture == "gemma2" and config.tie_word_embeddings
    assert config.layer_types == ["sliding_attention", "full_attention"] * 2
    assert (config.attn_logit_softcap, config.final_logit_softcap) == (5.0, 3.0)
    assert config.attention_scale == 24**-0.5 and config.activation == "gelu_pytorch_tanh"
    assert (config.max_position_embeddings, config.sliding_window) == (512, 128)
    attns = model_class(config)(config).attention_layers()
    assert [attn.sliding_window for attn in attns] == [128, None] * 2


def test_gemma3_config_old_and_new_rope_fields():
    new = gemma_hf_config("gemma3").to_dict()
    old = {k: v for k, v in new.items() if k not in ("rope_parameters", "layer_types")}
    old.update(
        rope_theta=1000000.0, rope_local_base_freq=10000.0, rope_scaling={"type": "linear", "factor": 4.0}
    )
    for cfg in (new, old):
        config = ModelConfig.from_hf(cfg)
        assert config.architecture == "gemma3" and config.attn_logit_softcap is None
        assert config.layer_types == ["sliding_attention", "full_attention"] * 2
        assert (config.rope_theta, config.local_rope_theta) == (1000000.0, 10000.0)
        assert config.rope_scaling["rope_type"] == "linear" and config.rope_scaling["factor"] == 4.0


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_logits_match_transformers_bf16(arch):
    hf = build_tiny_gemma(arch)
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
    # The same operations in the same dtype (embedding scale rounded to bf16, norms in float32): ours stays
    # closer to transformers' bf16 logits than those are to the float32 ones.
    assert (actual - expected).abs().max() < (expected - exact).abs().max()
