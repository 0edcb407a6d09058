"""A tiny random Mistral checkpoint whose sliding window (16 positions) is shorter than the prompts and
completions the model and engine suites run through it, so attending past the window changes the output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

WINDOW = 16

MISTRAL_CONFIG: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    sliding_window=WINDOW,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=None,
)


def build_tiny_mistral(path: Path | None = None, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A tiny random fp32 Mistral in eval mode with transformers' eager attention, saved to `path` if given.

    Norm scales are random around 1 and the init larger than the default, so next-token distributions are
    peaked and greedy choices are not decided by rounding noise."""
    from transformers import AutoModelForCausalLM, MistralConfig

    config = MistralConfig(**{**MISTRAL_CONFIG, "initializer_range": 0.2, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
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
