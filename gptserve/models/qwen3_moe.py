"""Qwen3-MoE: Qwen3's attention (per-head q_norm/k_norm before the rotary embedding) with a sparse
mixture-of-experts MLP (`mlp`: router `gate`, experts `gate_proj`/`up_proj`/`down_proj`), the chosen
experts' weights renormalised only when the config sets `norm_topk_prob`. Layers in `mlp_only_layers`, or
off the `decoder_sparse_step`, keep a dense MLP of `intermediate_size`.
"""

from __future__ import annotations

from gptserve.models.mixtral import MoeForCausalLM
from gptserve.models.qwen3 import Qwen3Attention


class Qwen3MoeForCausalLM(MoeForCausalLM):
    attention = Qwen3Attention
    mlp_name = "mlp"
    expert_parts = ("gate_proj", "up_proj", "down_proj")
