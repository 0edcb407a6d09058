"""Bad input raises an exception that names the problem."""

from __future__ import annotations

import json

import pytest

from gptserve import LLM, SamplingParams
from gptserve.errors import InvalidRequestError, ModelLoadError


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(str(tiny_models["gpt2"][0]), dtype="fp32", device="cpu", max_model_len=64)


def test_prompt_longer_than_max_model_len(llm):
    with pytest.raises(InvalidRequestError, match=r"100 tokens.*64"):
        llm.generate([list(range(100))], SamplingParams(max_tokens=4))
    assert llm.engine.core.kv.num_free_blocks == llm.engine.core.kv.num_blocks


def test_token_id_outside_vocabulary(llm):
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        llm.generate([[1, 2, 100000]], SamplingParams(max_tokens=4))


def test_text_prompt_without_tokenizer(llm):
    with pytest.raises(InvalidRequestError, match="tokenizer"):
        llm.generate("hello", SamplingParams(max_tokens=4))


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", -1.0),
        ("top_p", 0.0),
        ("top_k", -5),
        ("min_p", 1.5),
        ("max_tokens", 0),
        ("n", 0),
        ("presence_penalty", 3.0),
        ("repetition_penalty", 0.0),
        ("logprobs", 50),
    ],
)
def test_out_of_range_sampling_values_name_the_field(field, value):
    with pytest.raises(InvalidRequestError, match=field) as info:
        SamplingParams(**{field: value})
    assert info.value.param == field


def test_logit_bias_outside_vocabulary(llm):
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        llm.generate([[1, 2]], SamplingParams(logit_bias={99999: 1.0}))


def test_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ModelLoadError, match="bert"):
        LLM(str(tmp_path), device="cpu")


def test_missing_weights(tmp_path, tiny_models):
    src = tiny_models["llama"][0]
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(ModelLoadError):
        LLM(str(tmp_path), device="cpu")


def test_corrupt_weights(tmp_path, tiny_models):
    src = tiny_models["llama"][0]
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    data = (src / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        LLM(str(tmp_path), device="cpu")
