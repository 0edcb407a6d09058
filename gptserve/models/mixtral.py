"""Mixtral: Llama's attention and pre-norm residuals, with a sparse mixture-of-experts MLP
(`block_sparse_moe`: a router over `num_experts` SwiGLU experts, `num_experts_per_tok` chosen per token,
their weights renormalised over the chosen ones) in every layer.

`MoeForCausalLM` is shared with Qwen3-MoE, which brings its own attention and the name of its MoE block,
and keeps a dense Llama MLP on the layers its config says (`ModelConfig.is_moe_layer`). Expert weights
live stacked in `FusedMoE`; `load_weights` copies the checkpoint's per-expert tensors into them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from gptserve.config import ModelConfig
from gptserve.layers.attention import Attention
from gptserve.layers.embedding import parallel_lm_head, vocab_parallel_embedding
from gptserve.layers.fused import add_norm, run_blocks
from gptserve.layers.moe import SparseMoeBlock
from gptserve.layers.norms import RMSNorm
from gptserve.layers.parallel_linear import divide
from gptserve.layers.rotary import Rope, RotaryEmbedding
from gptserve.models.llama import LlamaAttention, LlamaMLP
from gptserve.models.moe_weights import ExpertWeightLoader
from gptserve.models.weights import load_hf_weights


def sparse_moe_block(config: ModelConfig) -> SparseMoeBlock:
    return SparseMoeBlock(
        config.num_experts,
        config.num_experts_per_tok,
        config.hidden_size,
        config.moe_intermediate_size,
        config.norm_topk_prob,
        config.activation,
    )


class MoeDecoderLayer(nn.Module):
    """Attention, then the MLP under `mlp_name`: the sparse MoE block, or a dense MLP on dense layers."""

    def __init__(
        self,
        config: ModelConfig,
        rotary_emb: RotaryEmbedding,
        layer: int,
        attention: type[LlamaAttention],
        mlp_name: str,
        sparse: bool,
    ):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.self_attn = attention(config, rotary_emb, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp_name = mlp_name
        setattr(self, mlp_name, sparse_moe_block(config) if sparse else LlamaMLP(config))

    def forward(
        self, rope: Rope, h: torch.Tensor, x: torch.Tensor, next_norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h = input_layernorm(x) -> (next_norm(x'), x'): each residual add fused with the norm after it."""
        h, x = add_norm(self.post_attention_layernorm, x, self.self_attn(rope, h))
        return add_norm(next_norm, x, getattr(self, self.mlp_name)(h))


class MoeModel(nn.Module):
    def __init__(self, config: ModelConfig, attention: type[LlamaAttention], mlp_name: str):
        super().__init__()
        self.rotary_emb = rotary_emb = RotaryEmbedding.from_config(config)
        self.embed_tokens = vocab_parallel_embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            MoeDecoderLayer(config, rotary_emb, i, attention, mlp_name, config.is_moe_layer(i))
            for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        rope = self.rotary_emb.cos_sin(positions, x.dtype)
        return run_blocks(self.layers, "input_layernorm", self.norm, x, rope)


class MoeForCausalLM(nn.Module):
    """A decoder with sparse MoE MLPs. Subclasses name their attention, MoE block and expert parts."""

    attention: type[LlamaAttention] = LlamaAttention
    mlp_name = "block_sparse_moe"
    expert_parts = ("w1", "w3", "w2")  # the checkpoint's names of each expert's gate, up and down

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = MoeModel(config, self.attention, self.mlp_name)
        self.lm_head = parallel_lm_head(
            self.model.embed_tokens, config.vocab_size, config.tie_word_embeddings
        )
        attn = self.model.layers[0].self_attn
        inner = divide(config.intermediate_size)
        self.packed_modules = {  # this rank's rows of each part (gate_up_proj: dense layers only)
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
        ignore = (".rotary_emb.inv_freq",) + (("lm_head.weight",) if self.config.tie_word_embeddings else ())
        experts = ExpertWeightLoader(self, *self.expert_parts)
        load_hf_weights(
            self, experts.others(weights), self.packed_modules, ignore, experts.stacked_parameters()
        )
        experts.check_complete()


class MixtralForCausalLM(MoeForCausalLM):
    pass
