"""GPT-J: one LayerNorm per block feeding attention and MLP in parallel, interleaved partial rotary.

q/k/v (no bias) are packed into one `qkv_proj` at load time; the head is untied and has a bias.
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


class GPTJAttention(nn.Module):
    def __init__(self, config: ModelConfig, rotary_emb: RotaryEmbedding):
        super().__init__()
        hidden, heads = config.hidden_size, divide(config.num_heads)  # this rank's heads
        self.q_size = heads * config.head_dim
        self.qkv_proj = column_parallel_linear(hidden, 3 * hidden, bias=False)
        self.out_proj = row_parallel_linear(hidden, hidden, bias=False)
        self.rotary_emb = rotary_emb
        self.attn = Attention(heads, heads, config.head_dim)

    def forward(self, rope: Rope, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        return self.out_proj(self.attn.forward_packed(qkv, self.rotary_emb, rope))


class GPTJMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc_in = column_parallel_linear(config.hidden_size, config.intermediate_size)
        self.fc_out = row_parallel_linear(config.intermediate_size, config.hidden_size)
        self.act = Activation(config.activation)
        bias_in_epilogue(self.fc_in, self.fc_out)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """fc_out(act(fc_in(x))) as (y, bias): fc_out's bias is left for the residual add where that fuses."""
        return linear_deferring_bias(self.fc_out, linear_activation(self.fc_in, self.act, x))


class GPTJBlock(nn.Module):
    def __init__(self, config: ModelConfig, rotary_emb: RotaryEmbedding):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = GPTJAttention(config, rotary_emb)
        self.mlp = GPTJMLP(config)
        defer_reduction(self.attn.out_proj, self.mlp.fc_out)  # one all-reduce for both, below

    def forward(
        self, rope: Rope, h: torch.Tensor, x: torch.Tensor, next_norm: nn.LayerNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h = ln_1(x) -> (next_norm(x'), x') with x' = x + attn(h) + mlp(h), the next block's (or the
        final) LayerNorm fused with the residual add."""
        attn = self.attn(rope, h)
        mlp, bias = self.mlp(h)
        return add_partials_norm(next_norm, x, attn, mlp, bias)


class GPTJModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.rotary_emb = rotary_emb = RotaryEmbedding.from_config(config, interleaved=True)  # shared
        self.wte = vocab_parallel_embedding(config.vocab_size, config.hidden_size)
        self.h = nn.ModuleList(GPTJBlock(config, rotary_emb) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.wte(input_ids)
        rope = self.rotary_emb.cos_sin(positions, x.dtype)  # looked up once for all layers
        return run_blocks(self.h, "ln_1", self.ln_f, x, rope)


class GPTJForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.transformer = GPTJModel(config)
        self.lm_head = parallel_lm_head(
            self.transformer.wte, config.vocab_size, config.tie_word_embeddings, bias=True
        )
        q = self.transformer.h[0].attn.q_size  # this rank's rows of each part
        self.packed_modules = {"qkv_proj": {"q_proj": q, "k_proj": q, "v_proj": q}}

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
        load_hf_weights(self, weights, self.packed_modules, ignore)
