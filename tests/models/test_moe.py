"""Mixtral and Qwen3-MoE: full-sequence logits against transformers on the same random weights, loaded
from the per-expert tensors of a saved checkpoint; routing that leaves experts without tokens; the
configs gptserve reads; a checkpoint missing an expert's tensor."""

from __future__ import annotations

import pytest
import torch

from gptserve.config import ModelConfig
from gptserve.errors import ModelLoadError
from gptserve.layers.moe import FusedMoE, SparseMoeBlock, route
from gptserve.models.registry import model_class
from tests.tiny_moe import build_tiny_moe, checkpoint_weights, moe_hf_config

CASES = {
    "mixtral": ("mixtral", {}),
    "qwen3_moe-renormalised": ("qwen3_moe", dict(norm_topk_prob=True)),
    "qwen3_moe-not-renormalised-dense-layer-1": (
        "qwen3_moe",
        dict(norm_topk_prob=False, mlp_only_layers=[1]),
    ),
}


def ours_and_hf(case: str, tmp_path) -> tuple[torch.nn.Module, torch.nn.Module]:
    arch, overrides = CASES[case]
    hf = build_tiny_moe(arch, tmp_path, **overrides)
    config = ModelConfig.from_hf(hf.config.to_dict())
    ours = model_class(config)(config).eval()
    ours.load_weights(checkpoint_weights(tmp_path).items())
    return ours, hf


def expert_token_counts(model: torch.nn.Module, tokens: torch.Tensor) -> list[list[int]]:
    """Per MoE layer, how many tokens each expert received while `model` ran over `tokens`."""
    counts: list[list[int]] = []

    def record(block: SparseMoeBlock, inputs, logits: torch.Tensor) -> None:
        _, ids = route(logits, block.experts.top_k, block.experts.renormalize)
        counts.append(torch.bincount(ids.flatten(), minlength=block.experts.num_experts).tolist())

    blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
    hooks = [b.gate.register_forward_hook(lambda mod, i, o, b=b: record(b, i, o)) for b in blocks]
    try:
        with torch.no_grad():
            model(tokens, torch.arange(len(tokens)))
    finally:
        for hook in hooks:
            hook.remove()
    return counts


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_fp32(case, tmp_path):
    ours, hf = ours_and_hf(case, tmp_path)
    tokens = torch.randint(0, hf.config.vocab_size, (48,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens[None]).logits[0]
        actual = ours.compute_logits(ours(tokens, torch.arange(len(tokens))))
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("case", ["mixtral", "qwen3_moe-renormalised"])
def test_uneven_routing_leaves_experts_idle_and_matches(case, tmp_path):
    ours, hf = ours_and_hf(case, tmp_path)
    # 3 tokens make 6 choices over 8 experts: at least two experts get no token in every layer; the
    # 48-token sequence is spread unevenly too.
    for length in (3, 48):
        tokens = torch.randint(0, hf.config.vocab_size, (length,), generator=torch.Generator().manual_seed(2))
        counts = expert_token_counts(ours, tokens)
        assert len(counts) == 2 and all(sum(c) == 2 * length for c in counts)
        assert all(max(c) > min(c) for c in counts)
        if length == 3:
            assert all(c.count(0) >= 2 for c in counts)
        with torch.no_grad():
            expected = hf(tokens[None]).logits[0]
            actual = ours.compute_logits(ours(tokens, torch.arange(length)))
        assert (actual - expected).abs().max().item() < 1e-4


def test_norm_topk_prob_changes_the_output(tmp_path):
    """Both Qwen3-MoE settings match transformers above; here they must also differ from each other."""
    tokens = torch.arange(10, 30)
    outputs = []
    for renormalise in (True, False):
        hf = build_tiny_moe("qwen3_moe", norm_topk_prob=renormalise)
        config = ModelConfig.from_hf(hf.config.to_dict())
        assert config.norm_topk_prob is renormalise
        with torch.no_grad():
            outputs.append(hf(tokens[None]).logits[0])
    assert (outputs[0] - outputs[1]).abs().max().item() > 1e-2


def test_configs():
    mixtral = ModelConfig.from_hf(moe_hf_config("mixtral").to_dict())
    assert (mixtral.architecture, mixtral.num_experts, mixtral.num_experts_per_tok) == ("mixtral", 8, 2)
    assert mixtral.norm_topk_prob and mixtral.moe_intermediate_size == 32
    assert all(mixtral.is_moe_layer(i) for i in range(2))
    qwen = ModelConfig.from_hf(
        moe_hf_config("qwen3_moe", mlp_only_layers=[0], norm_topk_prob=False).to_dict()
    )
    assert (qwen.architecture, qwen.head_dim, qwen.moe_intermediate_size, qwen.intermediate_size) == (
        "qwen3_moe",
        32,
        32,
        96,
    )
    assert not qwen.norm_topk_prob and not qwen.is_moe_layer(0) and qwen.is_moe_layer(1)
    step = ModelConfig.from_hf(moe_hf_config("qwen3_moe", decoder_sparse_step=2).to_dict())
    assert [step.is_moe_layer(i) for i in range(2)] == [False, True]
    model = model_class(qwen)(qwen)
    assert isinstance(model.model.layers[1].mlp.experts, FusedMoE)
    assert model.model.layers[1].mlp.experts.gate_up_proj.shape == (8, 64, 64)
    assert model.model.layers[0].mlp.gate_up_proj.weight.shape == (192, 64)


@pytest.mark.parametrize(
    "case,dropped",
    [
        ("mixtral", "model.layers.1.block_sparse_moe.experts.5.w3.weight"),
        ("qwen3_moe-renormalised", "model.layers.0.mlp.experts.7.down_proj.weight"),
    ],
)
def test_missing_expert_tensor_is_named(case, dropped, tmp_path):
    arch, overrides = CASES[case]
    hf = build_tiny_moe(arch, tmp_path, **overrides)
    config = ModelConfig.from_hf(hf.config.to_dict())
    weights = checkpoint_weights(tmp_path)
    del weights[dropped]
    with pytest.raises(ModelLoadError, match=f"lacks 1 weight.*{dropped.replace('.', '[.]')}"):
        model_class(config)(config).load_weights(weights.items())
