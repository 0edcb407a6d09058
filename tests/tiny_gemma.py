"""Tiny random Gemma 2 and Gemma 3 (text) checkpoints for the model and engine suites: local and global
layers, soft-capping (Gemma 2), per-head q/k norms and a local RoPE base (Gemma 3), tied embeddings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

GEMMA_CONFIG: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    query_pre_attn_scalar=24,  # not head_dim: a scale taken from head_dim would show
    max_position_embeddings=512,
    sliding_window=128,
    pad_token_id=0,
    bos_token_id=None,
    eos_token_id=None,
)
GEMMA2: dict[str, Any] = dict(attn_logit_softcapping=5.0, final_logit_softcapping=3.0)  # low: they bite
GEMMA3: dict[str, Any] = dict(
    sliding_window_pattern=2,
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0},
    },
)


def gemma_hf_config(arch: str, **overrides: Any):
    """A transformers Gemma2Config or Gemma3TextConfig from the tables, eager attention."""
    from transformers import Gemma2Config, Gemma3TextConfig

    cls, family = (Gemma2Config, GEMMA2) if arch == "gemma2" else (Gemma3TextConfig, GEMMA3)
    config = cls(**{**GEMMA_CONFIG, **family, "initializer_range": 0.2, **overrides})
    config._attn_implementation = "eager"  # soft-capping needs it
    return config


def build_tiny_gemma(arch: str, path: Path | None = None, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A tiny random Gemma model (fp32, eval, random norm scales), saved to `path` if given."""
    from transformers import Gemma2ForCausalLM, Gemma3ForCausalLM

    config = gemma_hf_config(arch, **overrides)
    torch.manual_seed(seed)
    model = (Gemma2ForCausalLM if arch == "gemma2" else Gemma3ForCausalLM)(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # Gemma scales by 1 + weight, initialised to zero
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    if path is not None:
        model.save_pretrained(path)
    return model
