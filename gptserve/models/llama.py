"""Llama (also SmolLM2, TinyLlama, Mistral-style GQA, Qwen2 with its biased q/k/v): RMSNorm, rotate-half
RoPE, SwiGLU, pre-norm residuals.

q/k/v are packed into one `qkv_proj` and gate/up into one `gate_up_proj` at load time, so each layer
runs four GEMMs. The model looks up the step's rotary tables once; every layer rotates its q and k heads
together, in place in the qkv output, and hands the packed qkv to attention.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from gptserve.config import ModelConfig
from gptserve.layers.activation import ActAndMul
from gptserve.layers.attention import Attention
from gptserve.layers.embedding import parallel_lm_head, vocab_parallel_embedding
from gptserve.layers.fused import add_norm, run_blocks
from gptserve.layers.norms import RMSNorm
from gptserve.layers.parallel_linear import column_parallel_linear, divide, row_parallel_linear
from gptserve.layers.rotary import Rope, RotaryEmbedding
from gptserve.models.weights import load_hf_weights


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, rotary_emb: RotaryEmbedding, layer: int):
        super().__init__()
        heads, kv_heads = divide(config.num_heads), divide(config.num_kv_heads)  # this rank's heads
        self.q_size, self.kv_size = heads * config.head_dim, kv_heads * config.head_dim
        hidden, bias, head_dim = config.hidden_size, config.attention_bias, config.head_dim
        qkv_size = (config.num_heads + 2 * config.num_kv_heads) * head_dim
        self.qkv_proj = column_parallel_linear(hidden, qkv_size, bias=bias or config.qkv_bias)
        self.o_proj = row_parallel_linear(config.num_heads * head_dim, hidden, bias=bias)
        self.rotary_emb = rotary_emb
        self.attn = Attention(heads, kv_heads, head_dim, sliding_window=config.sliding_window_for(layer))

    def forward(self, rope: Rope, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        return self.o_proj(self.attn.forward_packed(qkv, self.rotary_emb, rope))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_up_proj = column_parallel_linear(hidden, 2 * inner, bias=bias)
        self.down_proj = row_parallel_linear(inner, hidden, bias=bias)
        self.act_fn = ActAndMul(config.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        rotary_emb: RotaryEmbedding,
        layer: int,
        attention: type[LlamaAttention] = LlamaAttention,
    ):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.self_attn = attention(config, rotary_emb, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(
        self, rope: Rope, h: torch.Tensor, x: torch.Tensor, next_norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h = input_layernorm(x) -> (next_norm(x'), x'): each residual add fused with the norm after it."""
        h, x = add_norm(self.post_attention_layernorm, x, self.self_attn(rope, h))
        return add_norm(next_norm, x, self.mlp(h))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, attention: type[LlamaAttention] = LlamaAttention):
        super().__init__()
        # One cos/sin table shared by every layer.
        self.rotary_emb = rotary_emb = RotaryEmbedding.from_config(config)
        self.embed_tokens = vocab_parallel_embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, rotary_emb, i, attention) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        rope = self.rotary_emb.cos_sin(positions, x.dtype)
        return run_blocks(self.layers, "input_layernorm", self.norm, x, rope)


class LlamaForCausalLM(nn.Module):
    attention: type[LlamaAttention] = LlamaAttention  # every layer's; variants (Qwen3) bring their own

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, self.attention)
        self.lm_head = parallel_lm_head(
            self.model.embed_tokens, config.vocab_size, config.tie_word_embeddings
        )
        attn = self.model.layers[0].self_attn
        inner = divide(config.intermediate_size)
        self.packed_modules = {  # this rank's rows of each part
            "qkv_proj": {"q_proj": attn.q_size, "k_proj": attn.kv_size, "v_proj": attn.kv_size},
            "gate_up_proj": {"gate_proj": inner, "up_proj": inner},
        }

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        # inv_freq: a buffer older checkpoints saved; a tied head arrives as a copy of the embedding.
        ignore = (".rotary_emb.inv_freq",) + (("lm_head.weight",) if self.config.tie_word_embeddings else ())
        load_hf_weights(self, weights, self.packed_modules, ignore)
