"""Helpers the whole test suite shares: the one table of tiny model configs, building a tiny random
checkpoint from it, and a free loopback port. Session-scoped checkpoints built from these live in
`tests/conftest.py` (`tiny_models`, `tiny_gptj`, `tiny_gptj_tokenized`)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import torch

# One tiny config per architecture: two layers, 64 wide, four heads. Suites that need other shapes pass
# overrides (see `tiny_config_kwargs`) instead of keeping a table of their own.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(
        model_type="llama",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    ),
    "gptj": dict(
        model_type="gptj", vocab_size=512, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=256
    ),
    "gpt_neox": dict(
        model_type="gpt_neox",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        rotary_pct=0.5,
        max_position_embeddings=256,
        use_parallel_residual=True,
    ),
    "gpt2": dict(model_type="gpt2", vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=256),
}
ARCHS = list(TINY_CONFIGS)

# The config key each architecture keeps its number of positions under.
POSITIONS_KEY = {
    "llama": "max_position_embeddings",
    "gptj": "n_positions",
    "gpt_neox": "max_position_embeddings",
    "gpt2": "n_positions",
}

# GPT-J-6B's embedding rows: the GPT-2 vocabulary (50257 tokens) padded to 50400.
GPTJ_VOCAB = 50400


def tiny_config_kwargs(arch: str, max_positions: int | None = None, **overrides: Any) -> dict[str, Any]:
    """The table's entry for `arch`, `max_positions` under the architecture's own key, then `overrides`."""
    kwargs = dict(TINY_CONFIGS[arch])
    if max_positions is not None:
        kwargs[POSITIONS_KEY[arch]] = max_positions
    kwargs.update(overrides)
    return kwargs


def tiny_hf_config(arch: str, max_positions: int | None = None, **overrides: Any):
    """A `transformers` config of `arch` from the table (no BOS/EOS ids unless overridden)."""
    from transformers import AutoConfig

    kwargs = tiny_config_kwargs(arch, max_positions, **overrides)
    kwargs.setdefault("bos_token_id", None)
    kwargs.setdefault("eos_token_id", None)
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def build_tiny_model(arch: str, path: Path, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """Save a tiny random Hugging Face model of `arch` to `path` and return it (fp32, eval)."""
    from transformers import AutoModelForCausalLM

    # Larger init than the default keeps next-token distributions peaked, so greedy choices are not
    # decided by rounding noise.
    overrides.setdefault("initializer_range", 0.2)
    config = tiny_hf_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    return model


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
