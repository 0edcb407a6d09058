"""Tiny random Qwen2 and Qwen3 checkpoints for the model, engine, GGUF and tensor-parallel suites.

Kept apart from the shared `TINY_CONFIGS` table: each case below picks the shape that exercises a Qwen
feature (q/k/v biases, tied embeddings, a Qwen3 head_dim other than hidden / heads, per-head q/k norms).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

QWEN_CONFIGS: dict[str, dict[str, Any]] = {
    # Qwen2.5: GQA, biased q/k/v, unbiased o_proj; the small Qwen2.5 models tie their embeddings.
    "qwen2": dict(
        model_type="qwen2",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        use_sliding_window=False,
    ),
    # Qwen3: head_dim 32 with 4 heads over a hidden size of 64 (q is 128 wide), per-head q/k RMSNorm.
    "qwen3": dict(
        model_type="qwen3",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=256,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        use_sliding_window=False,
    ),
}


def qwen_hf_config(arch: str, **overrides: Any):
    """A `transformers` Qwen2Config / Qwen3Config from the table (no BOS/EOS ids unless overridden)."""
    from transformers import AutoConfig

    kwargs = {**QWEN_CONFIGS[arch], "bos_token_id": None, "eos_token_id": None, **overrides}
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def randomize_norms_and_biases_(model: torch.nn.Module, seed: int = 0) -> None:
    """Random RMSNorm scales around 1 (Qwen3's q_norm/k_norm included) and random biases, which
    transformers initialises to ones and zeros: a dropped or misplaced one then changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def build_tiny_qwen(arch: str, path: Path | None = None, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A tiny random Qwen model (fp32, eval, random norm scales and biases), saved to `path` if given."""
    from transformers import AutoModelForCausalLM

    # A larger init than the default keeps next-token distributions peaked, so greedy choices are not
    # decided by rounding noise.
    overrides.setdefault("initializer_range", 0.2)
    config = qwen_hf_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    randomize_norms_and_biases_(model, seed)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    if path is not None:
        model.save_pretrained(path)
    return model
