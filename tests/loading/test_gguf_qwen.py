"""GGUF files of Qwen2 and Qwen3 (written here with gguf-py from tiny random transformers models): the
config, names and row order read back, and the model loaded from them gives transformers' logits and
greedy tokens."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from gptserve.config import ModelConfig
from gptserve.errors import ModelLoadError
from gptserve.llm import LLM
from gptserve.loading.gguf_file import GGUFModelFile
from gptserve.loading.loader import load_checkpoint
from gptserve.models.registry import model_class
from gptserve.sampling_params import SamplingParams
from tests.conftest import hf_greedy
from tests.tiny_qwen import build_tiny_qwen

GGUF_ARCHS = {"qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}
CASES = {
    "qwen2-tied": ("qwen2", {}),
    "qwen3-untied": ("qwen3", {}),
    "qwen3-tied-attention-bias": ("qwen3", dict(tie_word_embeddings=True, attention_bias=True)),
}


def round_matrices_to_fp16_(model: torch.nn.Module) -> None:
    """Round every matrix to float16 values, as the file will store them (vectors stay float32)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(p.half().float())


def write_qwen_gguf(model: torch.nn.Module, path: Path) -> Path:
    """What llama.cpp's converter writes for a Qwen2/Qwen3 model: its metadata keys, gguf-py's tensor
    names, rows in Hugging Face order, matrices as F16 and vectors as F32, no `output` when tied."""
    config = model.config
    arch = config.model_type
    writer = gguf.GGUFWriter(str(path), arch)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    names = gguf.get_tensor_name_map(GGUF_ARCHS[arch], config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        module, suffix = hf_name.rsplit(".", 1)
        values = tensor.numpy().astype(np.float16 if tensor.dim() == 2 else np.float32)
        writer.add_tensor(f"{names.get_name(module)}.{suffix}", values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(params=list(CASES))
def hf_and_gguf(request, tmp_path) -> tuple[torch.nn.Module, Path]:
    arch, overrides = CASES[request.param]
    model = build_tiny_qwen(arch, **overrides)
    round_matrices_to_fp16_(model)
    return model, write_qwen_gguf(model, tmp_path / f"{arch}.gguf")


def test_config_matches_the_model(hf_and_gguf):
    hf, path = hf_and_gguf
    config = load_checkpoint(path).hf_config
    assert config["model_type"] == hf.config.model_type
    expected, got = ModelConfig.from_hf(hf.config.to_dict()), ModelConfig.from_hf(config)
    for field in ("architecture", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads"):
        assert getattr(got, field) == getattr(expected, field), field
    for field in ("head_dim", "intermediate_size", "norm_eps", "rope_theta", "tie_word_embeddings"):
        assert getattr(got, field) == getattr(expected, field), field
    assert (got.qkv_bias, got.attention_bias) == (expected.qkv_bias, expected.attention_bias)


def test_weights_keep_hugging_face_names_and_rows(hf_and_gguf):
    """No q/k row reordering for Qwen: every tensor comes back as transformers holds it."""
    hf, path = hf_and_gguf
    loaded = dict(GGUFModelFile(path).weights())
    expected = hf.state_dict()
    if hf.config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    assert sorted(loaded) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


def test_logits_match_transformers(hf_and_gguf):
    hf, path = hf_and_gguf
    checkpoint = load_checkpoint(path)
    config = ModelConfig.from_hf(checkpoint.hf_config)
    ours = model_class(config)(config).eval()
    ours.load_weights(checkpoint.weights())
    tokens = torch.randint(0, config.vocab_size, (48,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens[None]).logits[0]
        actual = ours.compute_logits(ours(tokens, torch.arange(len(tokens))))
    assert (actual - expected).abs().max().item() < 1e-4


def test_engine_on_the_gguf_generates_what_transformers_does(hf_and_gguf):
    hf, path = hf_and_gguf
    prompt = [5, 9, 33, 2, 7, 101, 250]
    expected, _ = hf_greedy(hf, prompt, 16)
    llm = LLM(str(path), device="cpu", dtype="fp32", num_kv_blocks=32, max_model_len=64, block_size=8)
    try:
        out = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    finally:
        llm.close()
    assert out[0].outputs[0].token_ids == expected


def test_unsupported_architecture_is_named(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "phi3")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="'phi3' is not supported .*llama, qwen2, qwen3"):
        GGUFModelFile(tmp_path / "m.gguf")
