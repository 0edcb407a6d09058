"""FasterTransformer GPT-J `c-model/N-gpu/` directories: `config.ini` + raw `model.*.bin` files.

The layout is what FT's `gptj_ckpt_convert.py` / `huggingface_gptj_ckpt_convert.py` write and
`GptJWeight.cc` reads: raw little-endian arrays (fp32, or fp16 when `weight_data_type` says so), the
column-parallel q|k|v and fc_in and the row-parallel out_proj and fc_out split into one file per rank
(`.{rank}.bin`), everything else whole. Per file, from Hugging Face (hidden H, intermediate F, N ranks):

    model.wte.bin                                            [V, H]       transformer.wte.weight
    model.final_layernorm.{weight,bias}.bin                  [H]          transformer.ln_f.*
    model.lm_head.weight.bin / .bias.bin                     [V, H] / [V] lm_head.*
    model.layers.L.input_layernorm.{weight,bias}.bin         [H]          h.L.ln_1.*
    model.layers.L.attention.query_key_value.weight.R.bin    [H, 3, H/N]  stack(q, k, v).permute(2, 0, 1)
    model.layers.L.attention.dense.weight.R.bin              [H/N, H]     attn.out_proj.weight.T
    model.layers.L.mlp.dense_h_to_4h.{weight,bias}.R.bin     [H, F/N]/[F/N] mlp.fc_in.weight.T / bias
    model.layers.L.mlp.dense_4h_to_h.weight.R.bin            [F/N, H]     mlp.fc_out.weight.T
    model.layers.L.mlp.dense_4h_to_h.bias.bin                [H]          mlp.fc_out.bias

A rank's files are exactly its Megatron slices, so a runtime with the same tensor-parallel size reads
only its own (`rank_weights`); any other size merges the ranks and re-splits.
"""

from __future__ import annotations

import configparser
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptserve.config import ModelConfig
from gptserve.errors import ModelLoadError
from gptserve.loading.checkpoint import Checkpoint
from gptserve.parallel.sharding import check_tensor_parallel, shard_hf_tensor

CONFIG_FILE = "config.ini"
_SECTION = "gptj"
_DTYPES = {"fp32": np.float32, "fp16": np.float16}
_RANK_FILE = re.compile(r"^model\.layers\.0\.attention\.dense\.weight\.(\d+)\.bin$")
_DIR_RANKS = re.compile(r"^(\d+)-gpu$")
_DEFAULT_POSITIONS = 2048  # GPT-J's context; config.ini does not record it


def is_ft_cmodel_dir(path: Path) -> bool:
    """Whether `path` holds a FasterTransformer `config.ini` beside `model.*.bin` files."""
    return (path / CONFIG_FILE).is_file() and any(path.glob("model.*.bin"))


def read_ft_config(directory: Path) -> dict[str, Any]:
    """`config.ini`'s `[gptj]` section as a Hugging Face GPT-J config (plus `weight_data_type`)."""
    path = directory / CONFIG_FILE
    parser = configparser.ConfigParser()
    try:
        parser.read(path, encoding="utf-8")
    except (OSError, configparser.Error) as error:
        raise ModelLoadError(f"cannot read {path}: {error}") from error
    if not parser.has_section(_SECTION):
        found = ", ".join(parser.sections()) or "none"
        raise ModelLoadError(
            f"{path} has no [{_SECTION}] section (found: {found}); only GPT-J c-models are read"
        )
    section = parser[_SECTION]

    def integer(key: str, default: int | None = None) -> int:
        value = section.get(key)
        if value is None and default is not None:
            return default
        try:
            return int(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ModelLoadError(f"{path}: [{_SECTION}] {key} must be an integer, got {value!r}") from None

    heads, head_size = integer("head_num"), integer("size_per_head")
    weight_type = section.get("weight_data_type", "fp32")
    if weight_type not in _DTYPES:
        raise ModelLoadError(f"{path}: weight_data_type {weight_type!r} is not one of {', '.join(_DTYPES)}")
    return {
        "model_type": "gptj",
        "architectures": ["GPTJForCausalLM"],
        "vocab_size": integer("vocab_size"),
        "n_embd": heads * head_size,
        "n_layer": integer("num_layer"),
        "n_head": heads,
        "n_inner": integer("inter_size"),
        "rotary_dim": integer("rotary_embedding"),
        "n_positions": integer("max_pos_seq_len", _DEFAULT_POSITIONS),
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "bos_token_id": integer("start_id"),
        "eos_token_id": integer("end_id"),
        "tie_word_embeddings": False,
        "weight_data_type": weight_type,
    }


class FTCModel:
    """An open c-model directory: config read, rank files counted and size-checked."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.hf_config = read_ft_config(self.directory)
        self.dtype = _DTYPES[self.hf_config.pop("weight_data_type")]
        self.config = ModelConfig.from_hf(self.hf_config)
        self.ranks = self._count_ranks()
        try:
            check_tensor_parallel(self.config, self.ranks)
        except ModelLoadError as error:
            raise ModelLoadError(f"{self.directory}: {error}") from None
        self._shapes = dict(self._files())
        for file, shape in self._shapes.items():
            self._check_size(file, shape)

    def checkpoint(self) -> Checkpoint:
        """This directory as a `Checkpoint` (no tokenizer: c-models carry none)."""
        return Checkpoint(
            hf_config=self.hf_config,
            weights=self.weights,
            tokenizer=None,
            chat_template=None,
            source=f"FasterTransformer c-model, {self.ranks} rank(s), {np.dtype(self.dtype).name}",
            rank_weights=self.rank_weights,
            tensor_parallel_size=self.ranks,
        )

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full Hugging Face tensors, the ranks' slices merged, one file group at a time."""
        return self._tensors(list(range(self.ranks)))

    def rank_weights(self, rank: int, world_size: int) -> Iterator[tuple[str, torch.Tensor]]:
        """Rank `rank`'s slices for a world of `world_size`: its own files when that is the stored size."""
        if world_size == self.ranks:
            return self._tensors([rank], vocab_split=(rank, world_size))
        return ((n, shard_hf_tensor(self.config, n, t, rank, world_size)) for n, t in self.weights())

    def _tensors(
        self, ranks: list[int], vocab_split: tuple[int, int] | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        c = self.config
        hidden = c.hidden_size

        def whole(name: str, hf_name: str) -> tuple[str, torch.Tensor]:
            tensor = self._read(self.directory / f"model.{name}.bin")
            if vocab_split is not None:
                tensor = shard_hf_tensor(c, hf_name, tensor, *vocab_split)
            return hf_name, tensor

        def split(name: str, axis: int) -> torch.Tensor:
            return torch.cat([self._read(self.directory / f"model.{name}.{r}.bin") for r in ranks], dim=axis)

        yield whole("wte", "transformer.wte.weight")
        for layer in range(c.num_layers):
            ft, hf = f"layers.{layer}.", f"transformer.h.{layer}."
            yield whole(ft + "input_layernorm.weight", hf + "ln_1.weight")
            yield whole(ft + "input_layernorm.bias", hf + "ln_1.bias")
            qkv = split(ft + "attention.query_key_value.weight", axis=2).view(hidden, 3, -1)
            for index, part in enumerate(("q_proj", "k_proj", "v_proj")):
                yield f"{hf}attn.{part}.weight", qkv[:, index, :].T.contiguous()
            del qkv
            yield f"{hf}attn.out_proj.weight", split(ft + "attention.dense.weight", axis=0).T.contiguous()
            yield f"{hf}mlp.fc_in.weight", split(ft + "mlp.dense_h_to_4h.weight", axis=1).T.contiguous()
            yield f"{hf}mlp.fc_in.bias", split(ft + "mlp.dense_h_to_4h.bias", axis=0)
            yield f"{hf}mlp.fc_out.weight", split(ft + "mlp.dense_4h_to_h.weight", axis=0).T.contiguous()
            yield whole(ft + "mlp.dense_4h_to_h.bias", hf + "mlp.fc_out.bias")
        yield whole("final_layernorm.weight", "transformer.ln_f.weight")
        yield whole("final_layernorm.bias", "transformer.ln_f.bias")
        yield whole("lm_head.weight", "lm_head.weight")
        yield whole("lm_head.bias", "lm_head.bias")

    def _count_ranks(self) -> int:
        found = {int(m[1]) for p in self.directory.iterdir() if (m := _RANK_FILE.match(p.name))}
        named = _DIR_RANKS.match(self.directory.name)
        ranks = int(named[1]) if named else max(found, default=-1) + 1
        for rank in range(max(ranks, 1)):
            if rank not in found:
                file = self.directory / f"model.layers.0.attention.dense.weight.{rank}.bin"
                raise ModelLoadError(
                    f"weight file {file} is missing ({ranks} tensor-parallel ranks expected)"
                )
        extra = sorted(found - set(range(ranks)))
        if extra:
            raise ModelLoadError(
                f"{self.directory} is named for {ranks} ranks but holds files of rank {extra[0]}"
            )
        return ranks

    def _files(self) -> Iterator[tuple[Path, tuple[int, ...]]]:
        """Every file this config implies, with the shape it must hold."""
        c, n = self.config, self.ranks
        hidden, inter, vocab = c.hidden_size, c.intermediate_size, c.vocab_size
        whole = {
            "wte": (vocab, hidden),
            "final_layernorm.weight": (hidden,),
            "final_layernorm.bias": (hidden,),
            "lm_head.weight": (vocab, hidden),
            "lm_head.bias": (vocab,),
        }
        per_rank: dict[str, tuple[int, ...]] = {}
        for layer in range(c.num_layers):
            ft = f"layers.{layer}."
            for name in ("input_layernorm.weight", "input_layernorm.bias", "mlp.dense_4h_to_h.bias"):
                whole[ft + name] = (hidden,)
            per_rank |= {
                ft + "attention.query_key_value.weight": (hidden, 3, hidden // n),
                ft + "attention.dense.weight": (hidden // n, hidden),
                ft + "mlp.dense_h_to_4h.weight": (hidden, inter // n),
                ft + "mlp.dense_h_to_4h.bias": (inter // n,),
                ft + "mlp.dense_4h_to_h.weight": (inter // n, hidden),
            }
        for name, shape in whole.items():
            yield self.directory / f"model.{name}.bin", shape
        for name, shape in per_rank.items():
            for rank in range(n):
                yield self.directory / f"model.{name}.{rank}.bin", shape

    def _check_size(self, file: Path, shape: tuple[int, ...]) -> None:
        expected = int(np.prod(shape)) * np.dtype(self.dtype).itemsize
        if not file.is_file():
            raise ModelLoadError(f"weight file {file} is missing")
        size = file.stat().st_size
        if size != expected:
            what = "truncated" if size < expected else "too large"
            raise ModelLoadError(
                f"weight file {file} is {what}: {size} bytes, but the config.ini implies shape "
                f"{list(shape)} of {np.dtype(self.dtype).name} = {expected} bytes"
            )

    def _read(self, file: Path) -> torch.Tensor:
        return torch.from_numpy(np.fromfile(file, dtype=self.dtype).reshape(self._shapes[file]))


def read_ft_checkpoint(directory: Path) -> Checkpoint:
    """Read a FasterTransformer GPT-J c-model directory."""
    return FTCModel(directory).checkpoint()
