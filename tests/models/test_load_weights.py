"""load_weights: Hugging Face names in, clear errors for missing, unexpected and mis-shaped tensors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gptserve.errors import ModelLoadError
from gptserve.layers.norms import RMSNorm

# One plain and one packed-projection (or converted) tensor per architecture.
NAMES = {
    "llama": [
        "model.norm.weight",
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
    ],
    "gptj": ["lm_head.bias", "transformer.h.1.attn.v_proj.weight"],
    "gpt_neox": ["gpt_neox.final_layer_norm.bias", "gpt_neox.layers.0.attention.query_key_value.bias"],
    "gpt2": ["transformer.wpe.weight", "transformer.h.1.attn.c_attn.weight"],
}
CASES = [(arch, name) for arch, names in NAMES.items() for name in names]


@pytest.mark.parametrize("arch,name", CASES)
def test_missing_weight_is_named(tiny_hf, new_model, arch, name):
    hf, cfg = tiny_hf(arch)
    weights = {k: v for k, v in hf.state_dict().items() if k != name}
    with pytest.raises(ModelLoadError, match=f"lacks 1 weight.*{name}"):
        new_model(cfg).load_weights(weights.items())


@pytest.mark.parametrize("arch,name", CASES)
def test_misshaped_weight_is_named(tiny_hf, new_model, arch, name):
    hf, cfg = tiny_hf(arch)
    weights = dict(hf.state_dict())
    weights[name] = weights[name][:-1]
    with pytest.raises(ModelLoadError, match=f"{name}.*shape"):
        new_model(cfg).load_weights(weights.items())


@pytest.mark.parametrize("arch", list(NAMES))
def test_unexpected_weight_is_named(tiny_hf, new_model, arch):
    hf, cfg = tiny_hf(arch)
    bogus = NAMES[arch][0].rsplit(".", 1)[0] + ".extra.weight"
    weights = {**hf.state_dict(), bogus: torch.zeros(3)}
    with pytest.raises(ModelLoadError, match=f"unexpected weight '{bogus}'"):
        new_model(cfg).load_weights(weights.items())


@pytest.mark.parametrize(
    "arch,extra",
    [
        ("llama", {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(8)}),
        (
            "gptj",
            {
                "transformer.h.0.attn.bias": torch.ones(1, 1, 8, 8),
                "transformer.h.0.attn.masked_bias": torch.zeros(()),
            },
        ),
        ("gpt_neox", {"gpt_neox.layers.0.attention.rotary_emb.inv_freq": torch.zeros(2)}),
        ("gpt2", {"transformer.h.0.attn.bias": torch.ones(1, 1, 8, 8)}),
    ],
)
def test_buffers_of_older_checkpoints_are_skipped(tiny_hf, new_model, arch, extra):
    hf, cfg = tiny_hf(arch)
    new_model(cfg).load_weights({**hf.state_dict(), **extra}.items())


def test_legacy_names_pythia_head_and_bare_gpt2(tiny_hf, new_model):
    hf, cfg = tiny_hf("gpt_neox")
    sd = hf.state_dict()
    sd["embed_out.weight"] = sd.pop("lm_head.weight")
    ours = new_model(cfg)
    ours.load_weights(sd.items())
    assert torch.equal(ours.lm_head.weight, hf.lm_head.weight)

    hf, cfg = tiny_hf("gpt2")
    bare = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    ours = new_model(cfg)
    ours.load_weights(bare.items())
    assert torch.equal(ours.lm_head.weight, hf.transformer.wte.weight)


def test_weights_are_cast_to_the_model_dtype(tiny_hf, new_model):
    hf, cfg = tiny_hf("llama")
    ours = new_model(cfg, torch.float16)
    ours.load_weights(hf.state_dict().items())
    qkv = ours.model.layers[0].self_attn.qkv_proj.weight
    assert qkv.dtype == torch.float16
    torch.testing.assert_close(
        qkv[:64].float(), hf.model.layers[0].self_attn.q_proj.weight, atol=1e-3, rtol=1e-3
    )


@pytest.mark.parametrize("arch", list(NAMES))
def test_projections_are_plain_linears(tiny_hf, new_model, arch):
    """Quantization swaps nn.Linear modules: every weight must live in one of these module kinds."""
    _, cfg = tiny_hf(arch)
    kinds = (nn.Linear, nn.Embedding, nn.LayerNorm, RMSNorm)
    for name, module in new_model(cfg).named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            assert isinstance(module, kinds), name


@pytest.mark.parametrize("arch", ["llama", "gptj", "gpt_neox"])
def test_own_packed_state_dict_reloads(build_pair, new_model, arch):
    """Packed names (qkv_proj, gate_up_proj) never occur in HF checkpoints, so our own layout loads as is."""
    hf, ours = build_pair(arch)
    again = new_model(hf.config.to_dict())
    again.load_weights(ours.state_dict().items())
    for (name, a), b in zip(ours.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
