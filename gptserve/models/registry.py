"""Architecture name -> model class. Each model file holds only its math.

Every model class follows one interface (see `gptserve/models/llama.py` for the pattern):
- `__init__(config: ModelConfig)` builds the layers (weights uninitialised; `load_weights` fills them);
- `forward(input_ids [T], positions [T]) -> hidden [T, hidden_size]` over the packed batch, attention
  through `gptserve.layers.attention.Attention` (one per layer, in layer order);
- `compute_logits(hidden [S, hidden_size]) -> [S, vocab_size]` in float32;
- `load_weights(weights: Iterable[(hf_name, tensor)])` takes Hugging Face state-dict names and raises
  `ModelLoadError` naming the tensor on a missing, unexpected or mis-shaped weight.
"""

from __future__ import annotations

import importlib

from torch import nn

from gptserve.config import ModelConfig
from gptserve.errors import ModelLoadError

_MODELS = {
    "llama": ("gptserve.models.llama", "LlamaForCausalLM"),
    "qwen2": ("gptserve.models.llama", "LlamaForCausalLM"),  # Llama with biased q/k/v (config.qkv_bias)
    "qwen3": ("gptserve.models.qwen3", "Qwen3ForCausalLM"),
    "phi3": ("gptserve.models.phi3", "Phi3ForCausalLM"),
    "mixtral": ("gptserve.models.mixtral", "MixtralForCausalLM"),
    "qwen3_moe": ("gptserve.models.qwen3_moe", "Qwen3MoeForCausalLM"),
    "gemma2": ("gptserve.models.gemma", "GemmaForCausalLM"),
    "gemma3": ("gptserve.models.gemma", "GemmaForCausalLM"),
    "gptj": ("gptserve.models.gptj", "GPTJForCausalLM"),
    "gpt_neox": ("gptserve.models.gpt_neox", "GPTNeoXForCausalLM"),
    "gpt2": ("gptserve.models.gpt2", "GPT2LMHeadModel"),
}


def model_class(config: ModelConfig) -> type[nn.Module]:
    """The model class implementing `config.architecture`."""
    try:
        module, name = _MODELS[config.architecture]
    except KeyError:
        raise ModelLoadError(f"no model code for architecture {config.architecture!r}") from None
    return getattr(importlib.import_module(module), name)
