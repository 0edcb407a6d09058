"""Full-sequence forward of each architecture against Hugging Face transformers on the same random weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from gptserve.layers.attention import Attention

LLAMA3_ROPE = dict(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,
)

CASES = {
    "llama-gqa-untied": ("llama", dict(tie_word_embeddings=False)),
    "llama-tied-bias": ("llama", dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
    "llama-rope-llama3": ("llama", dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0)),
    "llama-rope-linear": ("llama", dict(rope_scaling=dict(rope_type="linear", factor=2.0))),
    "llama-mha-head-dim-32": ("llama", dict(num_key_value_heads=4, head_dim=32)),
    "gptj-partial-rotary": ("gptj", dict(rotary_dim=8)),
    "gpt_neox-parallel": ("gpt_neox", dict(use_parallel_residual=True)),
    "gpt_neox-sequential": ("gpt_neox", dict(use_parallel_residual=False)),
    "gpt2": ("gpt2", {}),
    "gpt2-inverse-layer-scale": ("gpt2", dict(scale_attn_by_inverse_layer_idx=True)),
}


def logits_of_both(hf, ours, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        expected = hf(tokens[None]).logits[0].float()
        hidden = ours(tokens, torch.arange(len(tokens)))
        return expected, ours.compute_logits(hidden)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_fp32(build_pair, case):
    arch, overrides = CASES[case]
    hf, ours = build_pair(arch, **overrides)
    tokens = torch.randint(0, hf.config.vocab_size, (48,), generator=torch.Generator().manual_seed(1))
    expected, actual = logits_of_both(hf, ours, tokens)
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    assert (actual - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_logits_match_transformers_bf16(build_pair, arch):
    hf, ours = build_pair(arch, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    hf = hf.to(torch.bfloat16)
    tokens = torch.randint(0, hf.config.vocab_size, (32,), generator=torch.Generator().manual_seed(2))
    expected, actual = logits_of_both(hf, ours, tokens)
    # Same operations in the same dtype; the bound allows for differently ordered bf16 reductions.
    assert (actual - expected).abs().max().item() < 0.1


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tied_checkpoint_from_save_pretrained(tiny_hf, new_model, tmp_path, arch):
    hf, _ = tiny_hf(arch, tie_word_embeddings=True)
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    ours = new_model(config)
    ours.load_weights(load_file(tmp_path / "model.safetensors").items())
    tokens = torch.randint(0, config["vocab_size"], (24,), generator=torch.Generator().manual_seed(3))
    expected, actual = logits_of_both(hf, ours, tokens)
    assert (actual - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("arch", ["llama", "gptj", "gpt_neox", "gpt2"])
def test_attention_layers_in_order(build_pair, arch):
    _, ours = build_pair(arch)
    layers = ours.attention_layers()
    assert len(layers) == 2 and all(isinstance(a, Attention) for a in layers)
    modules = [m for m in ours.modules() if isinstance(m, Attention)]
    assert [id(a) for a in layers] == [id(m) for m in modules]
