"""Writers of the foreign GPT-J layouts for tests: a mesh-transformer-jax slim checkpoint and a
FasterTransformer c-model directory, each made from a tiny Hugging Face GPT-J.

They follow the producers, not gptserve's readers: the slim writer lays the leaves out as
mesh-transformer-jax's `write_ckpt` does (`jax.tree_flatten` order of `{params, step}`, consecutive
pieces, `np.savez` arrays, bf16 as `V2`), the c-model writer as FT's `huggingface_gptj_ckpt_convert.py`.
"""

from __future__ import annotations

import configparser
import json
from pathlib import Path

import numpy as np
import torch

ROOT = "causal_transformer_shard/~/"


def tiny_gptj(path: Path, seed: int = 0) -> torch.nn.Module:
    """A tiny random HF GPT-J saved at `path` (8 heads, so 8 shards split it), weights bf16-exact."""
    from tests.conftest import build_tiny_model

    model = build_tiny_model("gptj", path, seed=seed, n_head=8)
    round_to_bf16(model)
    model.save_pretrained(path)
    return model


def round_to_bf16(model: torch.nn.Module) -> torch.nn.Module:
    """Round every weight of `model` to bf16 in place (kept in its dtype), so bf16 storage is exact."""
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(torch.bfloat16).to(param.dtype))
    return model


def mtj_config(model: torch.nn.Module, shards: int) -> dict:
    c = model.config
    return {
        "layers": c.n_layer,
        "d_model": c.n_embd,
        "n_heads": c.n_head,
        "n_vocab": c.vocab_size,
        "pe": "rotary",
        "pe_rotary_dims": c.rotary_dim,
        "seq": c.n_positions,
        "cores_per_replica": shards,
        "norm": "layernorm",
    }


def _bf16(array: torch.Tensor) -> np.ndarray:
    return array.detach().to(torch.bfloat16).contiguous().view(torch.int16).numpy().view("V2")


def write_mtj_slim(
    model: torch.nn.Module, directory: Path, shards: int, pieces: int = 16, write_config: bool = True
) -> Path:
    """Write `model` (bf16-representable weights) as a slim checkpoint with `shards` shards.

    mesh-transformer-jax's embedding has a bias, which HF folds into `wte`: a random bf16 bias is stored
    and `model`'s `wte` is set to the folded value (w + b, rounded to bf16), so `model` stays the reference.
    Row-parallel biases are stored as each shard's part (b / shards); the sum gives b back exactly.
    """
    c = model.config
    sd = {k: v.detach().float().clone() for k, v in model.state_dict().items()}  # before the fold below
    g = torch.Generator().manual_seed(1)
    emb_bias = (torch.randn(c.n_embd, generator=g) * 0.05).to(torch.bfloat16).float()

    def cut(t: torch.Tensor, axis: int) -> list[torch.Tensor]:
        return list(torch.chunk(t, shards, dim=axis))

    def same(t: torch.Tensor) -> list[torch.Tensor]:
        return [t] * shards

    # module path -> param name -> one array per shard; haiku Linear weights are [in, out].
    params: dict[str, dict[str, list[torch.Tensor]]] = {
        ROOT + "embedding_shard/~/linear": {
            "w": cut(sd["transformer.wte.weight"], 0),
            "b": same(emb_bias / shards),
        },
        ROOT + "projection_shard/~/linear": {
            "w": cut(sd["lm_head.weight"].T, 1),
            "b": cut(sd["lm_head.bias"], 0),
        },
        ROOT + "projection_shard/~/replicated_layer_norm": {
            "scale": same(sd["transformer.ln_f.weight"]),
            "offset": same(sd["transformer.ln_f.bias"]),
        },
    }
    for i in range(c.n_layer):
        h = f"transformer.h.{i}."
        prefix = f"{ROOT}layer_{i}/~/"
        params[prefix + "linear"] = {"w": cut(sd[h + "attn.q_proj.weight"].T, 1)}
        params[prefix + "linear_1"] = {"w": cut(sd[h + "attn.v_proj.weight"].T, 1)}
        params[prefix + "linear_2"] = {"w": cut(sd[h + "attn.k_proj.weight"].T, 1)}
        params[prefix + "linear_3"] = {"w": cut(sd[h + "attn.out_proj.weight"].T, 0)}
        params[prefix + "linear_4"] = {
            "w": cut(sd[h + "mlp.fc_in.weight"].T, 1),
            "b": cut(sd[h + "mlp.fc_in.bias"], 0),
        }
        params[prefix + "linear_5"] = {
            "w": cut(sd[h + "mlp.fc_out.weight"].T, 0),
            "b": same(sd[h + "mlp.fc_out.bias"] / shards),
        }
        params[prefix + "replicated_layer_norm"] = {
            "scale": same(sd[h + "ln_1.weight"]),
            "offset": same(sd[h + "ln_1.bias"]),
        }
    # jax.tree_flatten: dict keys sorted at every level; {"params", "step"} puts step last.
    flat = [params[m][n] for m in sorted(params) for n in sorted(params[m])]
    with torch.no_grad():
        wte = model.transformer.wte.weight
        wte.copy_((wte.float() + emb_bias).to(torch.bfloat16).to(wte.dtype))

    directory.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        leaves = [_bf16(per_shard[shard]) for per_shard in flat] + [np.array(383500, dtype=np.int32)]
        shard_dir = directory / f"shard_{shard}"
        shard_dir.mkdir()
        k, m = divmod(len(leaves), pieces)  # mesh-transformer-jax's `split`
        for i in range(pieces):
            chunk = leaves[i * k + min(i, m) : (i + 1) * k + min(i + 1, m)]
            np.savez(shard_dir / f"{i}.npz", *chunk)
    if write_config:
        (directory / "config.json").write_text(json.dumps(mtj_config(model, shards)))
    return directory


def write_ft_cmodel(model: torch.nn.Module, directory: Path, tensor_parallel: int) -> Path:
    """Write `model` as FasterTransformer's `c-model/{N}-gpu/` (fp32 raw files, config.ini)."""
    c = model.config
    n = tensor_parallel
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    directory.mkdir(parents=True, exist_ok=True)

    def save(name: str, t: torch.Tensor) -> None:
        t.contiguous().numpy().astype(np.float32).tofile(directory / f"model.{name}.bin")

    def save_split(name: str, t: torch.Tensor, axis: int) -> None:
        for rank, part in enumerate(torch.chunk(t, n, dim=axis)):
            save(f"{name}.{rank}", part)

    save("wte", sd["transformer.wte.weight"])
    save("final_layernorm.weight", sd["transformer.ln_f.weight"])
    save("final_layernorm.bias", sd["transformer.ln_f.bias"])
    save("lm_head.weight", sd["lm_head.weight"])
    save("lm_head.bias", sd["lm_head.bias"])
    for i in range(c.n_layer):
        h, ft = f"transformer.h.{i}.", f"layers.{i}."
        save(ft + "input_layernorm.weight", sd[h + "ln_1.weight"])
        save(ft + "input_layernorm.bias", sd[h + "ln_1.bias"])
        qkv = torch.stack([sd[h + f"attn.{p}_proj.weight"] for p in "qkv"]).permute(2, 0, 1)  # [in, 3, out]
        save_split(ft + "attention.query_key_value.weight", qkv, 2)
        save_split(ft + "attention.dense.weight", sd[h + "attn.out_proj.weight"].T, 0)
        save_split(ft + "mlp.dense_h_to_4h.weight", sd[h + "mlp.fc_in.weight"].T, 1)
        save_split(ft + "mlp.dense_h_to_4h.bias", sd[h + "mlp.fc_in.bias"], 0)
        save_split(ft + "mlp.dense_4h_to_h.weight", sd[h + "mlp.fc_out.weight"].T, 0)
        save(ft + "mlp.dense_4h_to_h.bias", sd[h + "mlp.fc_out.bias"])
    ini = configparser.ConfigParser()
    ini["gptj"] = {
        "model_name": "gptj-tiny",
        "head_num": str(c.n_head),
        "size_per_head": str(c.n_embd // c.n_head),
        "inter_size": str(c.n_inner or 4 * c.n_embd),
        "num_layer": str(c.n_layer),
        "rotary_embedding": str(c.rotary_dim),
        "vocab_size": str(c.vocab_size),
        "start_id": str(c.bos_token_id if c.bos_token_id is not None else 0),
        "end_id": str(c.eos_token_id if c.eos_token_id is not None else 0),
        "weight_data_type": "fp32",
    }
    with open(directory / "config.ini", "w") as f:
        ini.write(f)
    return directory
