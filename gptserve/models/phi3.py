"""Phi-3 (and Phi-4-mini): Llama's layers under other names for what Llama's checkpoints split. The
checkpoint stores q|k|v as one `qkv_proj` and gate|up as one `gate_up_proj`, the very packing the Llama
model computes with, so they load as they are. LongRoPE ("su") scaling lives in the rotary embedding;
partial rotary (Phi-4-mini) in `config.rotary_dim`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from gptserve.models.llama import LlamaForCausalLM
from gptserve.models.weights import load_hf_weights


class Phi3ForCausalLM(LlamaForCausalLM):
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        ignore = (".rotary_emb.inv_freq",) + (("lm_head.weight",) if self.config.tie_word_embeddings else ())
        load_hf_weights(self, weights, None, ignore)
