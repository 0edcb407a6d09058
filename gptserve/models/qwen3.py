"""Qwen3: Llama's layers plus an RMSNorm over each q and each k head (`q_norm`, `k_norm`, weights of
head_dim, the same for every head) applied before the rotary embedding.

The norms run on the packed qkv output, q heads in one call and k heads in the other, and are written
back in place, so attention still receives one packed qkv and rotates it (on CUDA, in the kernel that
also writes the KV cache). Their weights span one head, so under tensor parallelism every rank holds
them whole.
"""

from __future__ import annotations

import torch

from gptserve.config import ModelConfig
from gptserve.layers.norms import RMSNorm
from gptserve.layers.rotary import Rope, RotaryEmbedding
from gptserve.models.llama import LlamaAttention, LlamaForCausalLM


class Qwen3Attention(LlamaAttention):
    def __init__(self, config: ModelConfig, rotary_emb: RotaryEmbedding, layer: int):
        super().__init__(config, rotary_emb, layer)
        self.head_dim = config.head_dim
        self.q_norm = RMSNorm(config.head_dim, config.norm_eps)
        self.k_norm = RMSNorm(config.head_dim, config.norm_eps)

    def forward(self, rope: Rope, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        num_tokens, q_end, k_end = qkv.shape[0], self.q_size, self.q_size + self.kv_size
        q = qkv[:, :q_end].view(num_tokens, -1, self.head_dim)  # views into qkv: the rows stay strided
        k = qkv[:, q_end:k_end].view(num_tokens, -1, self.head_dim)
        q.copy_(self.q_norm(q))
        k.copy_(self.k_norm(k))
        return self.o_proj(self.attn.forward_packed(qkv, self.rotary_emb, rope))


class Qwen3ForCausalLM(LlamaForCausalLM):
    attention = Qwen3Attention
