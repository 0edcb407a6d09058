"""Tiny test models: random Hugging Face models in each on-disk weight layout, minimal GGUF files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import torch

from tests.helpers import ARCHS, tiny_hf_config

ARCHITECTURES = tuple(ARCHS)
LAYOUTS = ("safetensors", "sharded_safetensors", "bin", "sharded_bin")

# The loader tests' shapes, over the shared table: a 96-token vocabulary holding BOS 0 and EOS 1, 128
# positions, a Llama MLP 112 wide (not a power of two) and a NeoX rotating a quarter of each head.
LOADER_SHAPES = dict(vocab_size=96, max_positions=128, bos_token_id=0, eos_token_id=1)
LOADER_ARCH_SHAPES = {"llama": dict(intermediate_size=112), "gpt_neox": dict(rotary_pct=0.25)}


def tiny_config(model_type: str):
    """A two-layer, 64-wide config of each architecture (token ids kept inside the tiny vocabulary)."""
    return tiny_hf_config(model_type, **LOADER_SHAPES, **LOADER_ARCH_SHAPES.get(model_type, {}))


def expected_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a loader must yield: the state dict, less an lm_head tied to the embedding."""
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save_bin(model: torch.nn.Module, directory: Path, shards: int) -> None:
    """Write the `pytorch_model*.bin` layout older transformers releases produced."""
    model.config.save_pretrained(directory)
    state = {name: tensor.clone() for name, tensor in expected_weights(model).items()}
    if shards == 1:
        torch.save(state, directory / "pytorch_model.bin")
        return
    names = list(state)
    weight_map = {}
    for shard in range(shards):
        file = f"pytorch_model-{shard + 1:05d}-of-{shards:05d}.bin"
        part = {name: state[name] for name in names[shard::shards]}
        torch.save(part, directory / file)
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": sum(t.numel() * 4 for t in state.values())}, "weight_map": weight_map}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def save_layout(model: torch.nn.Module, directory: Path, layout: str) -> Path:
    if layout == "safetensors":
        model.save_pretrained(directory)
    elif layout == "sharded_safetensors":
        model.save_pretrained(directory, max_shard_size="40KB")
    else:
        directory.mkdir(parents=True)
        save_bin(model, directory, shards=1 if layout == "bin" else 3)
    return directory


def add_bpe_files(directory: Path, vocab_files: tuple[Path, Path]) -> None:
    shutil.copy(vocab_files[0], directory / "vocab.json")
    shutil.copy(vocab_files[1], directory / "merges.txt")


def write_gguf(
    path: Path,
    arch: str,
    tensors: dict[str, np.ndarray],
    vocabulary: tuple[list[str], list[str]] | None = None,
    add_bos: bool = False,
) -> Path:
    """A minimal GGUF file: the metadata the Llama reader requires, the tensors, and optionally a
    byte-level BPE (tokens, merges) vocabulary whose tokens spelled `<...>` are control tokens."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(32)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_layer_norm_rms_eps(1e-5)
    if vocabulary is not None:
        tokens, merges = vocabulary
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(tokens)
        writer.add_token_merges(merges)
        writer.add_token_types([3 if t.startswith("<") else 1 for t in tokens])  # 3: control, 1: normal
        writer.add_bos_token_id(0)
        writer.add_eos_token_id(1)
        writer.add_add_bos_token(add_bos)
    for name, values in tensors.items():
        writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
