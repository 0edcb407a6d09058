"""GGUF: the embedded SmolLM2 file read into the same config, weights and tokenizer transformers gets."""

from __future__ import annotations

import inspect

import gguf
import numpy as np
import pytest
import torch

from gptserve.config import ModelConfig
from gptserve.loading.default_model import default_model_path
from gptserve.loading.loader import load_checkpoint

from .tiny_models import write_gguf

# A few tensors of each storage type, and q/k of the first and last layer (their rows are reordered).
SAMPLED_GGUF_TENSORS = (
    "token_embd.weight",
    "blk.0.attn_q.weight",
    "blk.0.attn_k.weight",
    "blk.0.attn_v.weight",
    "blk.0.attn_output.weight",
    "blk.0.ffn_down.weight",
    "blk.0.attn_norm.weight",
    "blk.29.attn_k.weight",
    "output_norm.weight",
)


def test_default_model_path(smollm2_path):
    assert smollm2_path == default_model_path()
    assert smollm2_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and smollm2_path.is_file()


def test_config(smollm2):
    config = smollm2.hf_config
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30
    assert config["hidden_size"] == 576
    assert config["intermediate_size"] == 1536
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["vocab_size"] == 49152
    assert config["tie_word_embeddings"] is True
    assert config["max_position_embeddings"] == 8192
    assert config["rope_theta"] == 100000.0 and config["rms_norm_eps"] == 1e-5
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert "head_dim" not in config  # 576 / 9 = 64 = rope.dimension_count
    model_config = ModelConfig.from_hf(config)
    assert (model_config.head_dim, model_config.num_kv_heads) == (64, 3)
    assert smollm2.source == "gguf Q4_1 (also F32, Q8_0)"


def test_weights_stream(smollm2, smollm2_file):
    stream = smollm2.weights()
    assert inspect.isgenerator(stream)
    name, tensor = next(stream)
    assert name == "model.embed_tokens.weight"
    assert tensor.dtype == torch.float32 and tensor.shape == (49152, 576)
    names = smollm2_file.hf_names()
    assert len(names) == 272 and "lm_head.weight" not in names
    assert "model.layers.29.self_attn.k_proj.weight" in names and "model.norm.weight" in names


def test_names_match_gguf_py_table(smollm2_file):
    """gguf-py's own Hugging Face -> GGUF name table maps our names back onto every stored tensor."""
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, smollm2_file.hf_config["num_hidden_layers"])
    mapped = []
    for hf_name in smollm2_file.hf_names():
        module, suffix = hf_name.rsplit(".", 1)
        mapped.append(f"{table.get_name(module)}.{suffix}")
    assert mapped == [t.name for t in smollm2_file.reader.tensors]


def test_weights_match_transformers_processing(smollm2_file):
    """Sampled tensors equal what transformers' GGUF loader makes of them (dequantize, q/k un-permute)."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS

    # The head counts the processor needs are checked against the known SmolLM2 shape in test_config.
    processor = TENSOR_PROCESSORS["llama"](config=smollm2_file.hf_config)
    hf_names = dict(zip((t.name for t in smollm2_file.reader.tensors), smollm2_file.hf_names(), strict=True))
    stored = {t.name: t for t in smollm2_file.reader.tensors}
    for gguf_name in SAMPLED_GGUF_TENSORS:
        tensor = stored[gguf_name]
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        expected = torch.from_numpy(np.copy(processor.process(weights=values, name=gguf_name).weights))
        assert torch.equal(smollm2_file.dequantized(hf_names[gguf_name]), expected), gguf_name


@pytest.mark.slow
def test_all_weights_match_transformers_model(smollm2_path, smollm2):
    """End to end: every tensor equals the model transformers loads from the GGUF (about 15-30 s)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32, local_files_only=True
    )
    expected = model.state_dict()
    expected.pop("lm_head.weight")  # tied to the embedding
    loaded = dict(smollm2.weights())
    assert sorted(loaded) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


@pytest.mark.parametrize(
    ("hf_name", "qtype"),
    [
        ("model.layers.0.self_attn.q_proj.weight", gguf.GGMLQuantizationType.Q4_1),
        ("model.layers.0.self_attn.k_proj.weight", gguf.GGMLQuantizationType.Q4_1),
        ("model.embed_tokens.weight", gguf.GGMLQuantizationType.Q8_0),
        ("model.norm.weight", gguf.GGMLQuantizationType.F32),
    ],
)
def test_raw_tensor(smollm2_file, hf_name, qtype):
    raw = smollm2_file.raw_tensor(hf_name)
    assert raw.qtype == qtype
    if qtype != gguf.GGMLQuantizationType.F32:
        assert raw.data.dtype == np.uint8 and raw.data.shape[0] == raw.shape[0]
    values = gguf.quants.dequantize(raw.data, raw.qtype).reshape(raw.shape)
    assert torch.equal(torch.from_numpy(np.copy(values)), smollm2_file.dequantized(hf_name))


def test_tokenizer_matches_transformers(smollm2, smollm2_path):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, local_files_only=True
    )
    tokenizer = smollm2.tokenizer
    for text in ("Hello, world!", "x = 12345 + héllo\n\n  indented", "<|im_start|>user\nhi<|im_end|>\n"):
        assert tokenizer(text).input_ids == reference(text).input_ids, text
    assert tokenizer.decode(tokenizer("Hello, world!").input_ids) == "Hello, world!"


def test_tokenizer_specials_and_no_bos(smollm2):
    tokenizer = smollm2.tokenizer
    assert tokenizer("Hello, world!").input_ids == [19556, 28, 905, 17]  # SmolLM2 adds no BOS
    for token, token_id in (("<|endoftext|>", 0), ("<|im_start|>", 1), ("<|im_end|>", 2)):
        assert tokenizer(token).input_ids == [token_id], token
    assert len(tokenizer) == smollm2.hf_config["vocab_size"]


def test_chat_template(smollm2):
    assert smollm2.chat_template and "<|im_start|>" in smollm2.chat_template
    prompt = smollm2.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}],
        chat_template=smollm2.chat_template,
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_load_checkpoint_dispatch():
    checkpoint = load_checkpoint(None)
    assert checkpoint.source.startswith("gguf Q4_1")
    assert checkpoint.hf_config["num_hidden_layers"] == 30
    assert checkpoint.tokenizer is not None


@pytest.mark.parametrize("add_bos", [True, False])
def test_tokenizer_add_bos_follows_metadata(tmp_path, add_bos):
    tokens = ["<s>", "</s>", "h", "e", "l", "o", "he", "ll", "hell", "hello"]
    merges = ["h e", "l l", "he ll", "hell o"]
    embedding = {"token_embd.weight": np.zeros((len(tokens), 8), np.float32)}
    path = write_gguf(tmp_path / "m.gguf", "llama", embedding, vocabulary=(tokens, merges), add_bos=add_bos)
    checkpoint = load_checkpoint(path)
    hello, eos = tokens.index("hello"), tokens.index("</s>")
    assert checkpoint.tokenizer("hello</s>").input_ids == [0] * add_bos + [hello, eos]
    assert checkpoint.hf_config["vocab_size"] == len(tokens) and checkpoint.chat_template is None
