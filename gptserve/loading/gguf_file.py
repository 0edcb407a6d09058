"""GGUF files (llama.cpp's format): metadata -> Hugging Face config (Llama, Qwen2, Qwen3), tensors ->
HF-named weights.

Weights are dequantized to float32 one tensor at a time. `GGUFModelFile.raw_tensor` hands out the
stored (still quantized) blocks for fast paths that compute on them directly.

For Llama, llama.cpp's converter reorders the rows of q_proj and k_proj (within each head it interleaves
the two rotary halves); both the dequantized and the raw tensors are given back in Hugging Face row order.
Qwen2 and Qwen3 are stored in Hugging Face row order (llama.cpp rotates them rotate-half, as transformers
does), so their rows are read as they are.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType

from gptserve.errors import ModelLoadError
from gptserve.loading.checkpoint import Checkpoint

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",  # Qwen3
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TENSOR_NAME = re.compile(r"^(?:blk\.(?P<layer>\d+)\.)?(?P<kind>\w+)\.(?P<suffix>weight|bias)$")
_ROPE_SCALING_TYPES = ("linear", "yarn")
# general.architecture -> the Hugging Face model class of the config built from the metadata.
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@dataclass
class RawTensor:
    """A tensor as stored: uint8 quantized blocks (row-major, one row of blocks per output row) or,
    for F32/F16, plain values; `shape` is the Hugging Face shape of the dequantized tensor."""

    data: np.ndarray
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]


_FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}


class GGUFModelFile:
    """An open GGUF file of a Llama, Qwen2 or Qwen3 model."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as error:
            raise ModelLoadError(f"{self.path} is not a readable GGUF file (truncated?): {error}") from error
        self.hf_config = self._hf_config()
        self._tensors = {self._hf_name(t.name): t for t in self.reader.tensors}
        tensors = self.reader.tensors
        unsupported = sorted({f"{t.tensor_type.name} ({t.name})" for t in tensors if not _can_dequantize(t)})
        if unsupported:
            raise ModelLoadError(f"{self.path}: unsupported GGUF tensor types: {', '.join(unsupported)}")

    def checkpoint(self) -> Checkpoint:
        """This file as a `Checkpoint` (builds the tokenizer; weights stay lazy)."""
        tokenizer = read_gguf_tokenizer(self)
        template = self.metadata("tokenizer.chat_template")
        if template is None and tokenizer is not None:
            template = getattr(tokenizer, "chat_template", None)
        return Checkpoint(
            hf_config=self.hf_config,
            weights=self.weights,
            tokenizer=tokenizer,
            chat_template=template,
            source=f"gguf {self.quant_summary()}",
            quantization=self.main_quant_type(),
        )

    def metadata(self, key: str, default: Any = None) -> Any:
        """A metadata value (str, number, bool or list), or `default` when the file lacks it."""
        field = self.reader.get_field(key)
        return default if field is None else field.contents()

    def hf_names(self) -> list[str]:
        """Hugging Face names of the stored tensors, in file order."""
        return list(self._tensors)

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, float32 tensor) pairs, each dequantized when reached."""
        for name in self._tensors:
            yield name, self.dequantized(name)

    def dequantized(self, hf_name: str) -> torch.Tensor:
        """One tensor as float32 in its Hugging Face shape and row order."""
        tensor = self._tensor(hf_name)
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(_hf_shape(tensor))
        values = self._to_hf_rows(hf_name, values)
        if not values.flags.writeable:  # F32 tensors come straight from the read-only memory map
            values = values.copy()
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))

    def raw_tensor(self, hf_name: str) -> RawTensor:
        """One tensor's stored blocks and quantization type, rows in Hugging Face order."""
        tensor = self._tensor(hf_name)
        return RawTensor(self._to_hf_rows(hf_name, tensor.data), tensor.tensor_type, _hf_shape(tensor))

    def main_quant_type(self) -> str | None:
        """The most common quantized storage type of the file's tensors (None if all are float)."""
        names = (t.tensor_type.name for t in self.reader.tensors)
        counts = Counter(n for n in names if n not in _FLOAT_TYPES)
        return counts.most_common(1)[0][0] if counts else None

    def quant_summary(self) -> str:
        """The storage types by tensor count, most common first, e.g. "Q4_1 (also F32, Q8_0)"."""
        counts = Counter(t.tensor_type.name for t in self.reader.tensors)
        main, *others = [name for name, _ in counts.most_common()]
        return f"{main} (also {', '.join(sorted(others))})" if others else main

    def _tensor(self, hf_name: str) -> gguf.ReaderTensor:
        try:
            return self._tensors[hf_name]
        except KeyError:
            raise ModelLoadError(f"{self.path} has no tensor {hf_name!r}") from None

    def _to_hf_rows(self, hf_name: str, rows: np.ndarray) -> np.ndarray:
        # Rows are whole output features in both the values and the quantized blocks, so the same
        # reordering serves both.
        if self.hf_config["model_type"] != "llama":
            return rows
        if ".self_attn.q_proj." in hf_name:
            return _unpermute_rotary_rows(rows, self.hf_config["num_attention_heads"])
        if ".self_attn.k_proj." in hf_name:
            return _unpermute_rotary_rows(rows, self.hf_config["num_key_value_heads"])
        return rows

    def _hf_name(self, gguf_name: str) -> str:
        match = _TENSOR_NAME.match(gguf_name)
        table = _GLOBAL_TENSORS if match is None or match["layer"] is None else _BLOCK_TENSORS
        hf_module = table.get(match["kind"]) if match else None
        if hf_module is None:
            raise ModelLoadError(
                f"{self.path}: tensor {gguf_name!r} has no Hugging Face counterpart; "
                "this GGUF uses a feature gptserve does not support"
            )
        prefix = "" if match["layer"] is None else f"model.layers.{match['layer']}."
        return f"{prefix}{hf_module}.{match['suffix']}"

    def _hf_config(self) -> dict[str, Any]:
        arch = self.metadata("general.architecture")
        if arch not in _ARCHITECTURES:
            supported = ", ".join(_ARCHITECTURES)
            raise ModelLoadError(f"{self.path}: GGUF architecture {arch!r} is not supported ({supported})")

        def get(key: str, default: Any = None, required: bool = False) -> Any:
            value = self.metadata(f"{arch}.{key}", default)
            if value is None and required:
                raise ModelLoadError(f"{self.path}: GGUF metadata lacks {arch}.{key}")
            if isinstance(value, list):
                raise ModelLoadError(f"{self.path}: per-layer {arch}.{key} is not supported")
            return value

        if get("expert_count", 0):
            raise ModelLoadError(f"{self.path}: mixture-of-experts GGUF models are not supported")
        hidden = get("embedding_length", required=True)
        heads = get("attention.head_count", required=True)
        head_dim = get("attention.key_length") or get("rope.dimension_count") or hidden // heads
        config: dict[str, Any] = {
            "model_type": arch,
            "architectures": [_ARCHITECTURES[arch]],
            "hidden_size": hidden,
            "intermediate_size": get("feed_forward_length", required=True),
            "num_hidden_layers": get("block_count", required=True),
            "num_attention_heads": heads,
            "num_key_value_heads": get("attention.head_count_kv") or heads,
            "rms_norm_eps": _float32_value(get("attention.layer_norm_rms_epsilon", required=True)),
            "rope_theta": _float32_value(get("rope.freq_base", 10000.0)),
            "max_position_embeddings": get("context_length", required=True),
            # The embedding's rows, not the tokenizer's token count, size the model's vocabulary.
            "vocab_size": self._embedding_rows(),
            "tie_word_embeddings": all(t.name != "output.weight" for t in self.reader.tensors),
            "hidden_act": "silu",
        }
        if head_dim != hidden // heads or arch == "qwen3":  # transformers' Qwen3Config defaults to 128
            config["head_dim"] = head_dim
        if arch == "qwen2":
            config["use_sliding_window"] = False  # llama.cpp's qwen2 attends to the whole context
        if arch == "qwen3":  # a biased Qwen3 biases all four projections
            config["attention_bias"] = any(t.name == "blk.0.attn_output.bias" for t in self.reader.tensors)
        for key, hf_key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
            token_id = self.metadata(f"tokenizer.ggml.{key}_token_id")
            if token_id is not None:
                config[hf_key] = token_id
        scaling = get("rope.scaling.type", "none")
        if scaling != "none":
            factor = get("rope.scaling.factor")
            if scaling not in _ROPE_SCALING_TYPES or factor is None:
                raise ModelLoadError(f"{self.path}: RoPE scaling {scaling!r} is not supported")
            config["rope_scaling"] = {"rope_type": scaling, "factor": float(factor)}
            original = get("rope.scaling.original_context_length")
            if original:
                config["rope_scaling"]["original_max_position_embeddings"] = original
        return config

    def _embedding_rows(self) -> int:
        embedding = next((t for t in self.reader.tensors if t.name == "token_embd.weight"), None)
        if embedding is None:
            raise ModelLoadError(f"{self.path} has no token_embd.weight tensor")
        return int(embedding.shape[1])


def read_gguf_checkpoint(path: Path) -> Checkpoint:
    """Read a GGUF file: config and tokenizer now, weights dequantized when streamed."""
    return GGUFModelFile(path).checkpoint()


def read_gguf_tokenizer(model_file: GGUFModelFile) -> PreTrainedTokenizerBase | None:
    """The tokenizer the GGUF metadata describes (transformers converts it), or None if it has none."""
    if model_file.metadata("tokenizer.ggml.model") is None:
        return None
    # The fast-tokenizer class builds the same tokenizer as AutoTokenizer does for a GGUF file, but
    # skips AutoTokenizer's first pass, which parses all the metadata again only to pick the class.
    from transformers import PreTrainedTokenizerFast

    path = model_file.path.resolve()
    try:
        return PreTrainedTokenizerFast.from_pretrained(
            str(path.parent), gguf_file=path.name, local_files_only=True
        )
    except Exception as error:
        raise ModelLoadError(f"cannot build the tokenizer from the metadata of {path}: {error}") from error


def _unpermute_rotary_rows(rows: np.ndarray, num_heads: int) -> np.ndarray:
    # Per head, HF rows are [first rotary half, second half]; llama.cpp stores them pairwise
    # interleaved (h0[0], h1[0], h0[1], ...). Reading the stored rows as (pair, half) and swapping
    # the two axes gives back (half, pair).
    head_rows = rows.shape[0] // num_heads
    grouped = rows.reshape(num_heads, head_rows // 2, 2, *rows.shape[1:])
    return grouped.swapaxes(1, 2).reshape(rows.shape)


def _float32_value(value: float) -> float:
    # GGUF stores these as float32; its shortest decimal spelling is the value config.json had (1e-05).
    return float(str(np.float32(value)))


def _hf_shape(tensor: gguf.ReaderTensor) -> tuple[int, ...]:
    # GGUF lists dimensions fastest-first; torch lists them slowest-first.
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))


def _can_dequantize(tensor: gguf.ReaderTensor) -> bool:
    # gguf.quants defines one class per block format it can dequantize, named after the type.
    qtype = tensor.tensor_type
    return qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) or hasattr(gguf.quants, qtype.name)
