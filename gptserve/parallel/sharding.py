"""Megatron tensor-parallel split of Hugging Face weights: which tensor splits how, one rank's slice, merge.

The split, per architecture, by Hugging Face module name:
- column-parallel (output features split, weight and bias): Llama and Qwen q/k/v/gate/up, GPT-J q/k/v/fc_in,
  GPT-NeoX query_key_value/dense_h_to_4h, GPT-2 c_attn/c_fc;
- row-parallel (input features split; the bias is replicated and added once after the all-reduce):
  Llama o/down, GPT-J out_proj/fc_out, GPT-NeoX dense/dense_4h_to_h, GPT-2 c_proj (attention and MLP);
- vocab-parallel (rows split, weight and bias): embed_tokens, wte, embed_in, embed_out, lm_head;
- replicated: everything else (norms, GPT-2's wpe, rotary and causal-mask buffers).

Split dimensions follow the stored layout: `nn.Linear` weights are [out, in], so column splits dim 0 and
row dim 1; GPT-2's Conv1D weights are [in, out], so column splits dim 1 and row dim 0. Two fused tensors:
GPT-NeoX `query_key_value` is laid out per head, [heads, (q, k, v), head_dim], so a contiguous block of
rows is a block of whole heads; GPT-2 `c_attn` concatenates q, k and v along its output, so each of the
three parts is split and the rank's parts are concatenated again; Phi-3's `qkv_proj` ([q; k; v], q wider
under GQA) and `gate_up_proj` ([gate; up]) likewise, part by part.

The vocabulary is padded, not required to divide: vocab-parallel tensors get zero rows up to the next
multiple of the world size (`padded_vocab_size`), so GPT-2's 50257 tokens split over any world. Padded
embedding rows are never looked up and padded logits are dropped after the gather. Heads, KV heads and
the intermediate size must divide by the world size (`check_tensor_parallel`).
"""

from __future__ import annotations

import torch

from gptserve.config import ModelConfig
from gptserve.errors import ModelLoadError

COLUMN, ROW, VOCAB, REPLICATED = "column", "row", "vocab", "replicated"

_VOCAB = {"embed_tokens", "wte", "embed_in", "embed_out", "lm_head"}
_SPLITS: dict[str, dict[str, str]] = {  # architecture -> Hugging Face module name -> kind
    "llama": {"q_proj": COLUMN, "k_proj": COLUMN, "v_proj": COLUMN, "gate_proj": COLUMN, "up_proj": COLUMN,
              "o_proj": ROW, "down_proj": ROW},
    "gptj": {"q_proj": COLUMN, "k_proj": COLUMN, "v_proj": COLUMN, "fc_in": COLUMN, "out_proj": ROW,
             "fc_out": ROW},
    "gpt_neox": {"query_key_value": COLUMN, "dense_h_to_4h": COLUMN, "dense": ROW, "dense_4h_to_h": ROW},
    "gpt2": {"c_attn": COLUMN, "c_fc": COLUMN, "c_proj": ROW},
}  # fmt: skip
_SPLITS["qwen2"] = _SPLITS["qwen3"] = _SPLITS["llama"]  # Qwen3's per-head q_norm/k_norm are replicated
_CONV1D = {"gpt2"}  # architectures whose projection weights are stored [in, out]
_FUSED_PARTS = {("gpt2", "c_attn"): 3}  # q, k and v concatenated along the split dimension
_SPLITS["phi3"] = {"qkv_proj": COLUMN, "gate_up_proj": COLUMN, "o_proj": ROW, "down_proj": ROW}
# Mixture of experts: each expert splits as a dense MLP does (Mixtral's w1/w3 gate/up, w2 down); the
# router (`gate`) is replicated, so every rank routes the same.
_SPLITS["mixtral"] = {**_SPLITS["llama"], "w1": COLUMN, "w3": COLUMN, "w2": ROW}
_SPLITS["qwen3_moe"] = _SPLITS["llama"]
_SPLITS["gemma2"] = _SPLITS["gemma3"] = _SPLITS["llama"]  # Gemma 3's per-head q_norm/k_norm are replicated


def padded_vocab_size(vocab_size: int, world_size: int) -> int:
    """The vocabulary rounded up to a multiple of `world_size`: the rows every rank holds, times the world."""
    return -(-vocab_size // world_size) * world_size


def check_tensor_parallel(config: ModelConfig, world_size: int) -> None:
    """Raise `ModelLoadError` naming the number when `config` cannot be split over `world_size` ranks.

    Attention heads, KV heads and the MLP (and MoE expert) intermediate sizes must divide; the vocabulary
    is padded.
    """
    if world_size < 1:
        raise ModelLoadError(f"tensor_parallel_size must be at least 1, got {world_size}")
    sizes = {
        "attention heads": config.num_heads,
        "key/value heads": config.num_kv_heads,
        "intermediate size": config.intermediate_size,
        "expert intermediate size": config.moe_intermediate_size,
    }
    for what, n in sizes.items():
        if n % world_size:
            raise ModelLoadError(
                f"{config.architecture} model has {n} {what}, which is not divisible by "
                f"tensor_parallel_size {world_size}"
            )


def shard_kind(config: ModelConfig, hf_name: str) -> str:
    """How the tensor named `hf_name` splits: "column", "row", "vocab" or "replicated".

    Row-parallel biases are "replicated". `shard_dim` gives the dimension a split kind cuts.
    """
    module, leaf = _module_and_leaf(hf_name)
    if module in _VOCAB:
        return VOCAB
    kind = _SPLITS.get(config.architecture, {}).get(module, REPLICATED)
    if kind == ROW and leaf != "weight":
        return REPLICATED
    return kind


def shard_dim(config: ModelConfig, hf_name: str, ndim: int = 2) -> int | None:
    """The dimension of the stored tensor `hf_name` (of `ndim` dimensions) that is split, or None."""
    kind = shard_kind(config, hf_name)
    if kind == REPLICATED:
        return None
    if kind == VOCAB or ndim == 1:
        return 0
    conv1d = config.architecture in _CONV1D
    if kind == COLUMN:
        return 1 if conv1d else 0
    return 0 if conv1d else 1


def shard_hf_tensor(
    config: ModelConfig, hf_name: str, tensor: torch.Tensor, rank: int, world_size: int
) -> torch.Tensor:
    """Rank `rank`'s slice of the full Hugging Face tensor `hf_name` (a fresh contiguous tensor).

    Replicated tensors come back unchanged; with `world_size` 1 every tensor does.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    dim = shard_dim(config, hf_name, tensor.dim())
    if world_size == 1 or dim is None:
        return tensor
    if shard_kind(config, hf_name) == VOCAB:
        tensor = _pad_vocab(config, hf_name, tensor, world_size)
    part_rows = _fused_part_rows(config, hf_name, tensor.shape[dim])
    if any(rows % world_size for rows in part_rows):
        raise ModelLoadError(
            f"weight {hf_name!r} has {tensor.shape[dim]} rows along dimension {dim}, which do not split "
            f"into {len(part_rows)} part(s) over tensor_parallel_size {world_size}"
        )
    chunks = [part.chunk(world_size, dim)[rank] for part in tensor.split(part_rows, dim)]
    if len(chunks) > 1:
        return torch.cat(chunks, dim)
    return chunks[0].clone(memory_format=torch.contiguous_format)


def merge_hf_shards(config: ModelConfig, hf_name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """The full Hugging Face tensor `hf_name` from every rank's slice, in rank order (the inverse of
    `shard_hf_tensor`). Replicated tensors are taken from rank 0."""
    if not shards:
        raise ValueError(f"no shards given for {hf_name!r}")
    dim = shard_dim(config, hf_name, shards[0].dim())
    if len(shards) == 1 or dim is None:
        return shards[0]
    world = len(shards)
    part_rows = [rows // world for rows in _fused_part_rows(config, hf_name, shards[0].shape[dim] * world)]
    per_part = [shard.split(part_rows, dim) for shard in shards]
    merged = torch.cat([torch.cat([p[i] for p in per_part], dim) for i in range(len(part_rows))], dim)
    if shard_kind(config, hf_name) == VOCAB:
        merged = merged.narrow(0, 0, config.vocab_size).clone()
    return merged


def _fused_part_rows(config: ModelConfig, hf_name: str, rows: int) -> list[int]:
    """The full sizes of the parts a fused tensor of `rows` rows concatenates, each split on its own:
    Phi-3's qkv_proj is [q; k; v] (q wider under GQA) and gate_up_proj is [gate; up]; [rows] when unfused."""
    module = _module_and_leaf(hf_name)[0]
    if config.architecture == "phi3" and module == "qkv_proj":
        q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        return [q, kv, kv]
    if config.architecture == "phi3" and module == "gate_up_proj":
        return [config.intermediate_size] * 2
    parts = _FUSED_PARTS.get((config.architecture, module), 1)
    if rows % parts:
        raise ModelLoadError(f"weight {hf_name!r} has {rows} rows, which do not split into {parts} parts")
    return [rows // parts] * parts


def _pad_vocab(config: ModelConfig, hf_name: str, tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    rows = tensor.shape[0]
    if rows != config.vocab_size:
        raise ModelLoadError(
            f"weight {hf_name!r} has {rows} vocabulary rows, the config says vocab_size {config.vocab_size}"
        )
    padded = padded_vocab_size(rows, world_size)
    if padded == rows:
        return tensor
    return torch.cat([tensor, tensor.new_zeros(padded - rows, *tensor.shape[1:])])


def _module_and_leaf(hf_name: str) -> tuple[str, str]:
    """`model.layers.0.self_attn.q_proj.weight` -> (`q_proj`, `weight`); `embed_out.weight` -> (`embed_out`,
    `weight`)."""
    module, _, leaf = hf_name.rpartition(".")
    return module.rpartition(".")[2], leaf
