"""mesh-transformer-jax GPT-J "slim" checkpoints (`step_N/shard_S/P.npz`) -> Hugging Face GPT-J weights.

Each `shard_S` directory holds one tensor-parallel shard of every leaf of `{params, step}` in
`jax.tree_flatten` order (haiku module paths string-sorted, so `layer_10` precedes `layer_2`; `step`
last), cut into consecutive pieces saved as `P.npz` with arrays `arr_0, arr_1, ...`. bf16 arrays are
stored as numpy `V2` and reinterpreted here. Shards are merged per leaf as mesh-transformer-jax's
`reshard` does: weights are concatenated along the axis the shard cut, LayerNorms are replicated (shard
0), and the biases of row-parallel layers (embedding, fc_out) are per-shard parts of a sum. Weights
are transposed to Hugging Face's [out, in] and the embedding bias is folded into `wte.weight`.

The checkpoint carries no hyper-parameters: they come from a mesh-transformer-jax config JSON
(`--config FILE` or `config.json` beside the shards), else GPT-J-6B's. Read with numpy only (no jax),
one layer at a time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptserve.errors import ModelLoadError
from gptserve.loading.checkpoint import Checkpoint

GPTJ_6B = {
    "layers": 28,
    "d_model": 4096,
    "n_heads": 16,
    "n_vocab": 50400,
    "pe_rotary_dims": 64,
    "seq": 2048,
    "cores_per_replica": 8,
}
_ROOT = "causal_transformer_shard/~/"
_SHARD_DIR = re.compile(r"^shard_(\d+)$")
_PIECE_FILE = re.compile(r"^(\d+)\.npz$")
_GPT2_EOS = 50256

# haiku module inside a layer -> (HF module, how shards merge: "in"/"out" = concatenated along that
# axis of the [in, out] weight; biases: "cat" for column-parallel, "sum" for row-parallel).
_LAYER_MODULES = {
    "linear": ("attn.q_proj", "out", None),
    "linear_1": ("attn.v_proj", "out", None),
    "linear_2": ("attn.k_proj", "out", None),
    "linear_3": ("attn.out_proj", "in", None),
    "linear_4": ("mlp.fc_in", "out", "cat"),
    "linear_5": ("mlp.fc_out", "in", "sum"),
}


@dataclass(frozen=True)
class Leaf:
    """One array of the checkpoint: its haiku path, its shape in one shard, how the shards merge."""

    path: str  # e.g. "causal_transformer_shard/~/layer_0/~/linear_4/w"
    shard_shape: tuple[int, ...]
    merge: str  # "in" / "out" (weights), "cat" / "sum" / "first" (vectors), "step"


def mtj_config(directory: Path, config_file: str | Path | None = None) -> dict[str, Any]:
    """The hyper-parameters: `config_file`, else `config.json` beside the shards, else GPT-J-6B's."""
    path = Path(config_file) if config_file is not None else directory / "config.json"
    if config_file is None and not path.is_file():
        return dict(GPTJ_6B)
    try:
        given = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot read the mesh-transformer-jax config {path}: {error}") from error
    if not isinstance(given, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    config = {key: given.get(key, default) for key, default in GPTJ_6B.items()}
    for key, value in config.items():
        if not isinstance(value, int) or value <= 0:
            raise ModelLoadError(f"{path}: {key} must be a positive integer, got {value!r}")
    return config


def leaves(config: dict[str, Any]) -> list[Leaf]:
    """Every leaf of a slim checkpoint of this config, in the order the pieces store them."""
    d, shards, vocab = config["d_model"], config["cores_per_replica"], config["n_vocab"]
    ff = 4 * d
    norm = {"offset": ((d,), "first"), "scale": ((d,), "first")}
    part = vocab // shards
    modules: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {
        _ROOT + "embedding_shard/~/linear": {"b": ((d,), "sum"), "w": ((part, d), "in")},
        _ROOT + "projection_shard/~/linear": {"b": ((part,), "cat"), "w": ((d, part), "out")},
        _ROOT + "projection_shard/~/replicated_layer_norm": norm,
    }
    for layer in range(config["layers"]):
        prefix = f"{_ROOT}layer_{layer}/~/"
        for module, (_, axis, bias) in _LAYER_MODULES.items():
            width = ff if module in ("linear_4", "linear_5") else d
            shape = (d, width // shards) if axis == "out" else (width // shards, d)
            params = {"w": (shape, axis)}
            if bias is not None:
                params["b"] = (((width // shards) if bias == "cat" else d,), bias)
            modules[prefix + module] = params
        modules[prefix + "replicated_layer_norm"] = norm
    # jax.tree_flatten sorts dictionary keys: module paths, then parameter names; `step` follows `params`.
    ordered = [Leaf(f"{m}/{name}", *modules[m][name]) for m in sorted(modules) for name in sorted(modules[m])]
    return [*ordered, Leaf("step", (), "step")]


def hf_config(config: dict[str, Any]) -> dict[str, Any]:
    """The Hugging Face GPT-J config of these hyper-parameters."""
    hf: dict[str, Any] = {
        "model_type": "gptj",
        "architectures": ["GPTJForCausalLM"],
        "vocab_size": config["n_vocab"],
        "n_embd": config["d_model"],
        "n_layer": config["layers"],
        "n_head": config["n_heads"],
        "rotary_dim": config["pe_rotary_dims"],
        "n_positions": config["seq"],
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": False,
    }
    if config["n_vocab"] > _GPT2_EOS:  # GPT-J's vocabulary is GPT-2's, padded
        hf["bos_token_id"] = hf["eos_token_id"] = _GPT2_EOS
    return hf


def is_mtj_slim_dir(path: Path) -> bool:
    """Whether `path` looks like a slim checkpoint: `shard_0/` holding `0.npz`."""
    return (path / "shard_0" / "0.npz").is_file()


class MTJSlimCheckpoint:
    """An open slim checkpoint: shard and piece files checked, leaves located, weights streamed."""

    def __init__(self, directory: str | Path, config_file: str | Path | None = None):
        self.directory = Path(directory)
        self.config = mtj_config(self.directory, config_file)
        self.shards = self._shard_dirs()
        self.leaves = leaves(self.config)
        self._leaf_by_path = {leaf.path: leaf for leaf in self.leaves}
        self._check_config()
        self.pieces = self._piece_names()
        self._where = self._locate_leaves()

    def checkpoint(self) -> Checkpoint:
        """This checkpoint as a `Checkpoint` (no tokenizer: the slim files carry none)."""
        return Checkpoint(
            hf_config=hf_config(self.config),
            weights=self.weights,
            tokenizer=None,
            chat_template=None,
            source=f"mesh-transformer-jax slim, {len(self.shards)} shards",
        )

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor) pairs, one leaf (all its shards) read at a time, in the stored dtype."""
        with ExitStack() as stack:  # the .npz handles stay open (zip directories only) until the end
            opened: dict[Path, Any] = {}

            def read(path: str) -> torch.Tensor:
                leaf = self._leaf_by_path[path]
                parts = []
                for shard in self.shards:
                    piece, key = self._where[path]
                    file = shard / piece
                    if file not in opened:
                        opened[file] = stack.enter_context(np.load(file))
                    parts.append(self._array(file, key, leaf, opened[file]))
                return _merge(leaf, parts)

            emb = _ROOT + "embedding_shard/~/linear/"
            wte = read(emb + "w")
            yield "transformer.wte.weight", (wte.float() + read(emb + "b").float()).to(wte.dtype)
            del wte
            for layer in range(self.config["layers"]):
                prefix = f"{_ROOT}layer_{layer}/~/"
                hf_prefix = f"transformer.h.{layer}."
                norm = prefix + "replicated_layer_norm/"
                yield hf_prefix + "ln_1.weight", read(norm + "scale")
                yield hf_prefix + "ln_1.bias", read(norm + "offset")
                for module, (hf_module, _, bias) in _LAYER_MODULES.items():
                    yield f"{hf_prefix}{hf_module}.weight", read(f"{prefix}{module}/w").T.contiguous()
                    if bias is not None:
                        yield f"{hf_prefix}{hf_module}.bias", read(f"{prefix}{module}/b")
            proj = _ROOT + "projection_shard/~/"
            yield "transformer.ln_f.weight", read(proj + "replicated_layer_norm/scale")
            yield "transformer.ln_f.bias", read(proj + "replicated_layer_norm/offset")
            yield "lm_head.weight", read(proj + "linear/w").T.contiguous()
            yield "lm_head.bias", read(proj + "linear/b")

    def _shard_dirs(self) -> list[Path]:
        found = {
            int(m[1]): p for p in self.directory.iterdir() if (m := _SHARD_DIR.match(p.name)) and p.is_dir()
        }
        expected = self.config["cores_per_replica"]
        count = max(found, default=-1) + 1
        missing = [i for i in range(max(count, expected)) if i not in found]
        if missing:
            raise ModelLoadError(
                f"{self.directory}: shard directory {self.directory / f'shard_{missing[0]}'} is missing "
                f"(cores_per_replica is {expected}, found {len(found)} shard directories)"
            )
        if count != expected:
            raise ModelLoadError(
                f"{self.directory} holds {count} shard directories but cores_per_replica is {expected}; "
                "give the checkpoint's mesh-transformer-jax config with --config"
            )
        return [found[i] for i in range(count)]

    def _check_config(self) -> None:
        c = self.config
        for what, value in (("n_heads", c["n_heads"]), ("d_model", c["d_model"]), ("n_vocab", c["n_vocab"])):
            if value % c["cores_per_replica"]:
                raise ModelLoadError(
                    f"{self.directory}: {what} {value} is not divisible by cores_per_replica "
                    f"{c['cores_per_replica']}"
                )
        if c["d_model"] % c["n_heads"]:
            raise ModelLoadError(
                f"{self.directory}: d_model {c['d_model']} is not divisible by n_heads {c['n_heads']}"
            )

    def _piece_names(self) -> list[str]:
        counts = {}
        for shard in self.shards:
            numbers = [int(m[1]) for p in shard.iterdir() if (m := _PIECE_FILE.match(p.name))]
            counts[shard] = max(numbers, default=-1) + 1
        count = max(counts.values())
        if count == 0:
            raise ModelLoadError(f"{self.shards[0]} holds no N.npz piece files")
        names = [f"{i}.npz" for i in range(count)]
        for shard in self.shards:
            for name in names:
                if not (shard / name).is_file():
                    raise ModelLoadError(f"piece file {shard / name} is missing (shards hold {count} pieces)")
        return names

    def _locate_leaves(self) -> dict[str, tuple[str, str]]:
        """Leaf path -> (piece file name, array name), from the array counts of shard 0's pieces."""
        located: list[tuple[str, str]] = []
        for shard in self.shards:
            keys_per_piece = []
            for name in self.pieces:
                file = shard / name
                try:
                    with np.load(file) as npz:
                        keys = sorted(npz.files, key=lambda k: int(k.removeprefix("arr_")))
                except Exception as error:
                    raise ModelLoadError(
                        f"piece file {file} is not a readable .npz (truncated?): {error}"
                    ) from None
                keys_per_piece.append(keys)
            entries = [(name, key) for name, keys in zip(self.pieces, keys_per_piece) for key in keys]
            if len(entries) != len(self.leaves):
                raise ModelLoadError(
                    f"{shard} holds {len(entries)} arrays in {len(self.pieces)} pieces, but a "
                    f"{self.config['layers']}-layer GPT-J slim checkpoint has {len(self.leaves)} "
                    "(check layers in the config)"
                )
            located = located or entries
        return {leaf.path: entry for leaf, entry in zip(self.leaves, located)}

    def _array(self, file: Path, key: str, leaf: Leaf, npz: Any) -> torch.Tensor:
        try:
            array = npz[key]
        except Exception as error:
            raise ModelLoadError(
                f"cannot read {key} ({leaf.path}) from {file} (truncated?): {error}"
            ) from None
        if tuple(array.shape) != leaf.shard_shape:
            raise ModelLoadError(
                f"{file}: {key} ({leaf.path}) has shape {tuple(array.shape)}, the config implies "
                f"{leaf.shard_shape} per shard (d_model {self.config['d_model']}, n_vocab "
                f"{self.config['n_vocab']}, {len(self.shards)} shards)"
            )
        if array.dtype == np.dtype("V2"):  # bfloat16, which numpy has no name for
            return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
        if array.dtype not in (np.float32, np.float16):
            raise ModelLoadError(
                f"{file}: {key} ({leaf.path}) has dtype {array.dtype}, expected bf16 (V2), fp16 or fp32"
            )
        return torch.from_numpy(np.ascontiguousarray(array))


def _merge(leaf: Leaf, parts: list[torch.Tensor]) -> torch.Tensor:
    if leaf.merge == "in":
        return torch.cat(parts, dim=0)
    if leaf.merge in ("out", "cat"):
        return torch.cat(parts, dim=-1)
    if leaf.merge == "sum":
        return torch.stack(parts).float().sum(0).to(parts[0].dtype)
    return parts[0]


def read_mtj_checkpoint(directory: Path, config_file: str | Path | None = None) -> Checkpoint:
    """Read a slim checkpoint directory (the one holding `shard_0`, `shard_1`, ...)."""
    return MTJSlimCheckpoint(directory, config_file).checkpoint()
