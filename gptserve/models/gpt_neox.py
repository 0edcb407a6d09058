"""GPT-NeoX (Pythia): two LayerNorms per block, parallel or sequential residual, partial rotate-half RoPE.

The checkpoint's fused `query_key_value` is laid out per head, rows [heads, (q, k, v), head_dim]; at load it
is regrouped into `qkv_proj` as [(q, k, v), heads, head_dim], so the GEMM output splits into contiguous q, k
and v as in the other models (the new name keeps the two layouts apart).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from gptserve.config import ModelConfig
from gptserve.layers.activation import Activation
from gptserve.layers.attention import Attention
from gptserve.layers.embedding import parallel_lm_head, vocab_parallel_embedding
from gptserve.layers.fused import (
    add_norm,
    add_partials_norm,
    bias_in_epilogue,
    linear_activation,
    linear_deferring_bias,
    run_blocks,
)
from gptserve.layers.parallel_linear import (
    column_parallel_linear,
    defer_reduction,
    divide,
    row_parallel_linear,
)
from gptserve.layers.rotary import Rope, RotaryEmbedding
from gptserve.models.weights import load_hf_weights


class GPTNeoXAttention(nn.Module):
    def __init__(self, config: ModelConfig, rotary_emb: RotaryEmbedding):
        super().__init__()
        hidden, bias, heads = config.hidden_size, config.attention_bias, divide(config.num_heads)
        self.q_size = heads * config.head_dim  # this rank's heads
        self.qkv_proj = column_parallel_linear(hidden, 3 * hidden, bias=bias)
        self.dense = row_parallel_linear(hidden, hidden, bias=bias)
        self.rotary_emb = rotary_emb
        self.attn = Attention(heads, heads, config.head_dim)

    def forward(self, rope: Rope, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        return self.dense(self.attn.forward_packed(qkv, self.rotary_emb, rope))


class GPTNeoXMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense_h_to_4h = column_parallel_linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = row_parallel_linear(config.intermediate_size, config.hidden_size)
        self.act = Activation(config.activation)
        bias_in_epilogue(self.dense_h_to_4h, self.dense_4h_to_h)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The MLP as (y, bias): the last bias is left for the residual add where that fuses."""
        return linear_deferring_bias(self.dense_4h_to_h, linear_activation(self.dense_h_to_4h, self.act, x))


class GPTNeoXLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary_emb: RotaryEmbedding):
        super().__init__()
        self.use_parallel_residual = config.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.attention = GPTNeoXAttention(config, rotary_emb)
        self.mlp = GPTNeoXMLP(config)
        if self.use_parallel_residual:  # one all-reduce for both, below
            defer_reduction(self.attention.dense, self.mlp.dense_4h_to_h)

    def forward(
        self, rope: Rope, h: torch.Tensor, x: torch.Tensor, next_norm: nn.LayerNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h = input_layernorm(x) -> (next_norm(x'), x'): each residual add fused with the norm after it."""
        attn = self.attention(rope, h)
        if self.use_parallel_residual:  # x' = x + attn(ln1(x)) + mlp(ln2(x))
            mlp, bias = self.mlp(self.post_attention_layernorm(x))
            return add_partials_norm(next_norm, x, mlp, attn, bias)
        h, x = add_norm(self.post_attention_layernorm, x, attn)
        mlp, bias = self.mlp(h)
        return add_norm(next_norm, x, mlp, bias=bias)


class GPTNeoXModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.rotary_emb = rotary_emb = RotaryEmbedding.from_config(config)  # shared by every layer
        self.embed_in = vocab_parallel_embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GPTNeoXLayer(config, rotary_emb) for _ in range(config.num_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_in(input_ids)
        rope = self.rotary_emb.cos_sin(positions, x.dtype)  # looked up once for all layers
        return run_blocks(self.layers, "input_layernorm", self.final_layer_norm, x, rope)


class GPTNeoXForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.gpt_neox = GPTNeoXModel(config)
        self.lm_head = parallel_lm_head(self.gpt_neox.embed_in, config.vocab_size, config.tie_word_embeddings)
        self.heads = divide(config.num_heads)  # this rank's heads
        self.packed_modules = {"qkv_proj": {"query_key_value": 3 * self.heads * config.head_dim}}

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.gpt_neox(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def attention_layers(self) -> list[Attention]:
        return [layer.attention.attn for layer in self.gpt_neox.layers]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        # Buffers older checkpoints saved: the causal mask and the rotary frequencies.
        ignore = (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")
        if self.config.tie_word_embeddings:
            ignore += ("lm_head.weight",)
        load_hf_weights(self, self._convert(weights), self.packed_modules, ignore)

    def _convert(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
        heads, head_dim = self.heads, self.config.head_dim
        for name, tensor in weights:
            if name.startswith("embed_out."):  # the head's name before transformers 5
                name = "lm_head." + name.removeprefix("embed_out.")
            # A mis-shaped tensor passes through unchanged so the loader reports it by name.
            if ".query_key_value." in name and tensor.shape[0] == 3 * heads * head_dim:
                rest = tensor.shape[1:]
                tensor = tensor.reshape(heads, 3, head_dim, *rest).transpose(0, 1).reshape(tensor.shape)
            yield name, tensor
