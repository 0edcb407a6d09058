"""Hugging Face model directories: `config.json`, safetensors or PyTorch `.bin` weights, tokenizer files.

Weight names are normalised to what current `transformers` models call them in `state_dict()`:
legacy spellings are renamed, non-persistent buffers some old checkpoints still carry are dropped,
and a tied `lm_head.weight` is never yielded (the model ties it to the embedding itself).
"""

from __future__ import annotations

import json
import logging
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open

from gptserve.config import ModelConfig
from gptserve.errors import ModelLoadError
from gptserve.loading.checkpoint import Checkpoint

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

# Attention-mask and rotary tables that old checkpoints saved as if they were weights.
_BUFFER_NAMES = re.compile(r"\.(attn|attention)\.(masked_)?bias$|rotary_emb\.inv_freq$")


def read_hf_checkpoint(directory: Path) -> Checkpoint:
    """Read a Hugging Face directory; weights are streamed later, one tensor at a time."""
    hf_config = read_config(directory)
    tied = ModelConfig.from_hf(hf_config).tie_word_embeddings
    model_type = hf_config["model_type"]
    files, kind = weight_files(directory)

    def weights() -> Iterator[tuple[str, torch.Tensor]]:
        for raw_name, tensor in _iter_files(files, kind):
            name = hf_weight_name(model_type, raw_name, tied)
            if name is not None:
                yield name, tensor

    tokenizer = read_tokenizer(directory)
    shards = f", {len(files)} shards" if len(files) > 1 else ""
    return Checkpoint(
        hf_config=hf_config,
        weights=weights,
        tokenizer=tokenizer,
        chat_template=read_chat_template(directory, tokenizer),
        source=f"hf {kind}{shards}",
    )


def read_config(directory: Path) -> dict[str, Any]:
    """`config.json` as a dictionary, checked to describe a supported architecture."""
    path = directory / "config.json"
    hf_config = _read_json(path)
    if not isinstance(hf_config, dict) or "model_type" not in hf_config:
        raise ModelLoadError(f"{path} has no 'model_type' field, so the architecture is unknown")
    try:
        ModelConfig.from_hf(hf_config)  # rejects an unsupported model_type or a missing field now
    except ModelLoadError as error:
        raise ModelLoadError(f"{path}: {error}") from None
    return hf_config


def weight_files(directory: Path) -> tuple[list[Path], str]:
    """The weight files of a directory and their kind ("safetensors" or "bin"), each checked readable."""
    for index_name, single_name, kind in (
        (SAFETENSORS_INDEX, SAFETENSORS_SINGLE, "safetensors"),
        (BIN_INDEX, BIN_SINGLE, "bin"),
    ):
        if (directory / index_name).is_file():
            files = _files_from_index(directory / index_name)
        elif (directory / single_name).is_file():
            files = [directory / single_name]
        else:
            # Unindexed shards, e.g. `model-00001-of-00002.safetensors` copied without their index.
            pattern = "*.safetensors" if kind == "safetensors" else "pytorch_model*.bin"
            files = sorted(directory.glob(pattern))
        if files:
            for file in files:
                _check_readable(file, kind)
            return files, kind
    raise ModelLoadError(
        f"{directory} has config.json but no weights: expected {SAFETENSORS_SINGLE}, "
        f"{SAFETENSORS_INDEX} with its shards, {BIN_SINGLE} or {BIN_INDEX}"
    )


def hf_weight_name(model_type: str, name: str, tied: bool) -> str | None:
    """The `state_dict()` name of a stored weight, or None for entries that are not weights."""
    if _BUFFER_NAMES.search(name):
        return None
    if model_type == "gpt_neox" and name.startswith("embed_out."):
        name = "lm_head." + name[len("embed_out.") :]
    elif model_type == "gpt2" and not name.startswith(("transformer.", "lm_head.")):
        # The original GPT-2 checkpoints were saved from the bare `GPT2Model`.
        name = "transformer." + name
    if tied and name == "lm_head.weight":
        return None
    return name


def read_tokenizer(directory: Path) -> PreTrainedTokenizerBase | None:
    """The directory's tokenizer, or None when it ships no tokenizer files."""
    has_bpe_files = (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()
    has_other_files = any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer.model"))
    if not (has_bpe_files or has_other_files):
        return None
    from transformers import AutoTokenizer, GPT2Tokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as auto_error:
        if not has_bpe_files:
            raise ModelLoadError(f"cannot read the tokenizer in {directory}: {auto_error}") from auto_error
        # vocab.json + merges.txt is byte-level BPE whatever the model's own tokenizer class expects.
        logger.info("reading %s/vocab.json + merges.txt as a GPT-2 byte-level BPE tokenizer", directory)
        try:
            return GPT2Tokenizer.from_pretrained(str(directory), local_files_only=True)
        except Exception as error:
            raise ModelLoadError(f"cannot read the tokenizer in {directory}: {error}") from error


def read_chat_template(directory: Path, tokenizer: PreTrainedTokenizerBase | None) -> str | None:
    """`chat_template.jinja`, else `tokenizer_config.json`'s `chat_template`, else the tokenizer's."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config_path = directory / "tokenizer_config.json"
    template = _read_json(config_path).get("chat_template") if config_path.is_file() else None
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if template is None and tokenizer is not None:
        template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) else None


def _files_from_index(index_path: Path) -> list[Path]:
    weight_map = _read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(f"{index_path} has no 'weight_map'")
    names = list(dict.fromkeys(weight_map.values()))
    missing = [name for name in names if not (index_path.parent / name).is_file()]
    if missing:
        raise ModelLoadError(f"{index_path} names shard files that are missing: {', '.join(missing)}")
    return [index_path.parent / name for name in names]


def _check_readable(path: Path, kind: str) -> None:
    """Fail at load time, naming the file, rather than halfway through streaming weights."""
    try:
        if kind == "safetensors":
            # The header lists every tensor's byte range; a truncated file no longer covers them.
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        elif _is_zip(path):
            # torch.save's zip format ends in a central directory, which truncation removes.
            with zipfile.ZipFile(path) as archive:
                archive.namelist()
    except Exception as error:
        raise ModelLoadError(f"weight file {path} is corrupt or truncated: {error}") from error


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _iter_files(files: list[Path], kind: str) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        reader = _iter_safetensors if kind == "safetensors" else _iter_bin
        try:
            yield from reader(path)
        except ModelLoadError:
            raise
        except Exception as error:
            raise ModelLoadError(f"cannot read weights from {path}: {error}") from error


def _iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open handles have keys() but no __iter__)
            yield name, f.get_tensor(name)


def _iter_bin(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    # mmap keeps the shard on disk, so only the tensor being copied is paged in; the legacy
    # (pre-zip) format cannot be mapped and is read whole.
    state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    if not isinstance(state_dict, dict):
        raise ModelLoadError(f"{path} does not hold a state dict (found {type(state_dict).__name__})")
    for name in list(state_dict):
        # Popping lets a tensor read without mmap be freed once the model has copied it.
        yield name, state_dict.pop(name)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot read {path}: {error}") from error
