"""GPT-2: learned absolute positions, pre-LayerNorm blocks, fused qkv with bias, tied head.

Hugging Face stores GPT-2 projections as Conv1D with weights [in, out]; they are transposed at load into
`nn.Linear`'s [out, in] under the same names, so `load_weights` takes Hugging Face tensors only (this
model's own state dict would be transposed again).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from gptserve.config import ModelConfig
from gptserve.layers.activation import Activation
from gptserve.layers.attention import Attention
from gptserve.layers.embedding import embedding, parallel_lm_head, vocab_parallel_embedding
from gptserve.layers.fused import (
    add_norm,
    bias_in_epilogue,
    linear_activation,
    linear_deferring_bias,
    run_blocks,
)
from gptserve.layers.parallel_linear import column_parallel_linear, divide, row_parallel_linear
from gptserve.models.weights import load_hf_weights

_CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")


class GPT2Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        hidden = config.hidden_size
        self.c_attn = column_parallel_linear(hidden, 3 * hidden)
        self.c_proj = row_parallel_linear(hidden, hidden)
        # GPT-2-only switches that ModelConfig does not carry; absent means GPT-2's defaults.
        hf = config.hf_config
        scale = config.head_dim**-0.5 if hf.get("scale_attn_weights", True) else 1.0
        if hf.get("scale_attn_by_inverse_layer_idx", False):
            scale /= layer_idx + 1
        heads = divide(config.num_heads)  # this rank's heads
        self.attn = Attention(heads, heads, config.head_dim, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.attn.forward_packed(self.c_attn(x)))


class GPT2MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = column_parallel_linear(config.hidden_size, config.intermediate_size)
        self.c_proj = row_parallel_linear(config.intermediate_size, config.hidden_size)
        self.act = Activation(config.activation)
        bias_in_epilogue(self.c_fc, self.c_proj)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The MLP as (y, bias): c_proj's bias is left for the residual add where that fuses."""
        return linear_deferring_bias(self.c_proj, linear_activation(self.c_fc, self.act, x))


class GPT2Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = GPT2MLP(config)

    def forward(
        self, h: torch.Tensor, x: torch.Tensor, next_norm: nn.LayerNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h = ln_1(x) -> (next_norm(x'), x'): each residual add fused with the norm after it."""
        h, x = add_norm(self.ln_2, x, self.attn(h))
        mlp, bias = self.mlp(h)
        return add_norm(next_norm, x, mlp, bias=bias)


class GPT2Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.wte = vocab_parallel_embedding(config.vocab_size, config.hidden_size)
        self.wpe = embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.wte(input_ids) + self.wpe(positions)
        return run_blocks(self.h, "ln_1", self.ln_f, x)


class GPT2LMHeadModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.lm_head = parallel_lm_head(self.transformer.wte, config.vocab_size, config.tie_word_embeddings)
        self.packed_modules: dict[str, dict[str, int]] = {}

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.transformer(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def attention_layers(self) -> list[Attention]:
        return [block.attn.attn for block in self.transformer.h]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        # attn.bias / attn.masked_bias: causal-mask buffers that older checkpoints saved.
        ignore = (".attn.bias", ".attn.masked_bias")
        if self.config.tie_word_embeddings:
            ignore += ("lm_head.weight",)
        load_hf_weights(self, self._to_linear(weights), ignore=ignore)

    def _to_linear(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            # The original GPT-2 files were saved from the bare GPT2Model, without the "transformer." prefix.
            if not name.startswith(("transformer.", "lm_head.")):
                name = "transformer." + name
            if name.endswith(_CONV1D) and tensor.dim() == 2:
                tensor = tensor.t()
            yield name, tensor
