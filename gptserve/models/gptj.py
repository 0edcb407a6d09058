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
from gptserve.layers.rotary import Rope, RotaryEmbedding
from gptserve.models.weights import embedding, lm_head, load_hf_weights, uninitialized


class GPTJAttention(nn.Module):
    def __init__(self, config: ModelConfig, rotary_emb: RotaryEmbedding):
        super().__init__()
        hidden = config.hidden_size
        self.hidden_size = hidden
        self.qkv_proj = uninitialized(nn.Linear, hidden, 3 * hidden, bias=False)
        self.out_proj = uninitialized(nn.Linear, hidden, hidden, bias=False)
        self.rotary_emb = rotary_emb
        self.attn = Attention(config.num_heads, config.num_heads, config.head_dim)

    def forward(self, rope: Rope, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        self.rotary_emb.rotate_(qkv[:, : 2 * self.hidden_size], rope)  # q and k heads, in place
        return self.out_proj(self.attn.forward_packed(qkv))


class GPTJMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc_in = uninitialized(nn.Linear, config.hidden_size, config.intermediate_size)
        self.fc_out = uninitialized(nn.Linear, config.intermediate_size, config.hidden_size)
        self.act = Activation(config.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


class GPTJBlock(nn.Module):
    def __init__(self, config: ModelConfig, rotary_emb: RotaryEmbedding):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = GPTJAttention(config, rotary_emb)
        self.mlp = GPTJMLP(config)

    def forward(self, rope: Rope, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        return self.attn(rope, h) + self.mlp(h) + x


class GPTJModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.rotary_emb = rotary_emb = RotaryEmbedding.from_config(config, interleaved=True)  # shared
        self.wte = embedding(config.vocab_size, config.hidden_size)
        self.h = nn.ModuleList(GPTJBlock(config, rotary_emb) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.wte(input_ids)
        rope = self.rotary_emb.cos_sin(positions, x.dtype)  # looked up once for all layers
        for block in self.h:
            x = block(rope, x)
        return self.ln_f(x)


class GPTJForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.transformer = GPTJModel(config)
        self.lm_head = lm_head(self.transformer.wte, config.tie_word_embeddings, bias=True)
        hidden = config.hidden_size
        self.packed_modules = {"qkv_proj": {"q_proj": hidden, "k_proj": hidden, "v_proj": hidden}}

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
