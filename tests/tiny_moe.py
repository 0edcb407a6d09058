"""Tiny random Mixtral and Qwen3-MoE checkpoints for the model, engine and tensor-parallel suites:
hidden 64, 2 layers, 8 experts with 2 chosen per token, vocabulary 512."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

MOE_CONFIGS: dict[str, dict[str, Any]] = {
    "mixtral": dict(
        model_type="mixtral",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        sliding_window=None,
    ),
    # head_dim 32 with 4 heads over a hidden size of 64; a dense MLP of another width on mlp_only_layers.
    "qwen3_moe": dict(
        model_type="qwen3_moe",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        max_position_embeddings=256,
        use_sliding_window=False,
    ),
}


def moe_hf_config(arch: str, **overrides: Any):
    """A `transformers` MixtralConfig / Qwen3MoeConfig from the table (no BOS/EOS ids unless overridden)."""
    from transformers import AutoConfig

    kwargs = {**MOE_CONFIGS[arch], "bos_token_id": None, "eos_token_id": None, **overrides}
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def build_tiny_moe(arch: str, path: Path | None = None, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A tiny random MoE model (fp32, eval, norm scales around 1), saved to `path` if given."""
    from transformers import AutoModelForCausalLM

    # A larger init than the default keeps next-token distributions peaked (greedy choices not decided by
    # rounding noise) and the router's choices far from ties.
    overrides.setdefault("initializer_range", 0.2)
    config = moe_hf_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    if path is not None:
        model.save_pretrained(path)
    return model


def checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    """The saved checkpoint's tensors by their stored (per-expert) names."""
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))
