"""Gemma 2 and Gemma 3 (text): Llama's attention and gated MLP with Gemma's changes.

- Embeddings are multiplied by sqrt(hidden_size), rounded to the activation dtype first.
- RMSNorm scales by (1 + weight) in float32 (`GemmaRMSNorm`); each block norms its input and its output
  around attention and around the MLP (pre- and post-norms) before the residual add.
- The MLP is GeGLU: gelu_pytorch_tanh(gate) * up, on a packed gate|up projection.
- Attention scales scores by query_pre_attn_scalar ** -0.5; Gemma 2 soft-caps them (Attention's
  `softcap`); Gemma 3 norms each q and k head (`q_norm`, `k_norm`) before the rotary embedding.
- Layers alternate local (sliding-window) and global attention (`config.layer_types`); Gemma 3's local
  layers rotate with their own base (`config.local_rope_theta`) and see only the last
  `config.sliding_window` positions.
- The final logits may be soft-capped; the LM head is tied to the embeddings.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from gptserve.config import ModelConfig
from gptserve.layers.activation import ActAndMul
from gptserve.layers.attention import Attention
from gptserve.layers.embedding import parallel_lm_head, vocab_parallel_embedding
from gptserve.layers.norms import GemmaRMSNorm
from gptserve.layers.parallel_linear import column_parallel_linear, divide, row_parallel_linear
from gptserve.layers.rotary import Rope, RotaryEmbedding
from gptserve.models.weights import load_hf_weights


class GemmaAttention(nn.Module):
    def __init__(self, config: ModelConfig, sliding: bool):
        super().__init__()
        heads, kv_heads, head_dim = divide(config.num_heads), divide(config.num_kv_heads), config.head_dim
        self.q_size, self.kv_size, self.head_dim = heads * head_dim, kv_heads * head_dim, head_dim
        self.sliding = sliding
        hidden, bias = config.hidden_size, config.attention_bias
        qkv_size = (config.num_heads + 2 * config.num_kv_heads) * head_dim
        self.qkv_proj = column_parallel_linear(hidden, qkv_size, bias=bias)
        self.o_proj = row_parallel_linear(config.num_heads * head_dim, hidden, bias=bias)
        self.per_head_norms = config.architecture == "gemma3"
        if self.per_head_norms:
            self.q_norm = GemmaRMSNorm(head_dim, config.norm_eps)
            self.k_norm = GemmaRMSNorm(head_dim, config.norm_eps)
        window = config.sliding_window if sliding else None
        self.attn = Attention(
            heads, kv_heads, head_dim, config.attention_scale, config.attn_logit_softcap, window
        )

    def forward(self, rotary_emb: RotaryEmbedding, rope: Rope, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        if self.per_head_norms:  # in place on views into qkv, as Qwen3 does
            num_tokens, q_end, k_end = qkv.shape[0], self.q_size, self.q_size + self.kv_size
            q = qkv[:, :q_end].view(num_tokens, -1, self.head_dim)
            k = qkv[:, q_end:k_end].view(num_tokens, -1, self.head_dim)
            q.copy_(self.q_norm(q))
            k.copy_(self.k_norm(k))
        return self.o_proj(self.attn.forward_packed(qkv, rotary_emb, rope))


class GemmaMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_up_proj = column_parallel_linear(hidden, 2 * inner, bias=False)
        self.down_proj = row_parallel_linear(inner, hidden, bias=False)
        self.act_fn = ActAndMul(config.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, sliding: bool):
        super().__init__()
        hidden, eps = config.hidden_size, config.norm_eps
        self.self_attn = GemmaAttention(config, sliding)
        self.mlp = GemmaMLP(config)
        self.input_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps)

    def forward(self, rotary_emb: RotaryEmbedding, rope: Rope, x: torch.Tensor) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(rotary_emb, rope, self.input_layernorm(x)))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.embed_tokens = vocab_parallel_embedding(config.vocab_size, config.hidden_size)
        # One table per kind of layer: global layers use the config's base (and scaling), local ones theirs.
        self.rotary_emb = RotaryEmbedding.from_config(config)
        self.local_rotary_emb = RotaryEmbedding(
            config.head_dim, config.head_dim, config.max_position_embeddings, config.local_rope_theta
        )
        types = config.layer_types or ["full_attention"] * config.num_layers
        self.layers = nn.ModuleList(GemmaDecoderLayer(config, kind == "sliding_attention") for kind in types)
        self.norm = GemmaRMSNorm(config.hidden_size, config.norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        x = x * torch.tensor(self.hidden_size**0.5, dtype=x.dtype)  # rounded to the dtype, as transformers
        rope = self.rotary_emb.cos_sin(positions, x.dtype)
        local_rope = self.local_rotary_emb.cos_sin(positions, x.dtype)
        for layer in self.layers:
            sliding = layer.self_attn.sliding
            x = layer(
                self.local_rotary_emb if sliding else self.rotary_emb, local_rope if sliding else rope, x
            )
        return self.norm(x)


class GemmaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = GemmaModel(config)
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
        logits = self.lm_head(hidden).float()
        cap = self.config.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        ignore = (".rotary_emb.inv_freq",) + (("lm_head.weight",) if self.config.tie_word_embeddings else ())
        load_hf_weights(self, weights, self.packed_modules, ignore)
