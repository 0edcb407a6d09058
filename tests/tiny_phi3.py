"""Tiny random Phi-3 checkpoints (fused qkv_proj and gate_up_proj, optional LongRoPE) for the model and
engine suites."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

PHI3_CONFIG: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=None,
    eos_token_id=None,
)

# LongRoPE with a short original length, so a few dozen tokens cross it; factors of head_dim / 2 = 8.
LONGROPE = dict(
    max_position_embeddings=256,
    original_max_position_embeddings=32,
    rope_scaling=dict(
        type="longrope",
        short_factor=[1.0, 1.05, 1.1, 1.2, 1.4, 1.7, 2.0, 2.5],
        long_factor=[1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 13.0, 20.0],
    ),
)


def build_tiny_phi3(path: Path | None = None, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A tiny random Phi-3 (fp32, eval, eager attention, random norm scales), saved to `path` if given."""
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(**{**PHI3_CONFIG, "initializer_range": 0.2, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(config).eval()
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
