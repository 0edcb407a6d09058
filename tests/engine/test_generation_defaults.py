"""Default sampling values from the model (`--generation-config auto|none|PATH`): which file gives them,
which keys count, bad values refused at start-up, and `LLM` sampling with them when given no params."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from gptserve.errors import GptServeError
from gptserve.generation_defaults import GenerationDefaults
from gptserve.llm import LLM
from gptserve.loading.generation_config import SMOLLM2_CARD_DEFAULTS, read_generation_defaults
from gptserve.sampling_params import SamplingParams
from tests.helpers import build_tiny_model

CONFIG = {"do_sample": True, "temperature": 0.6, "top_p": 0.8, "top_k": 3, "repetition_penalty": 1.2,
          "max_new_tokens": 64, "bos_token_id": 1}  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama-generation-config")
    build_tiny_model("llama", path)
    (path / "generation_config.json").write_text(json.dumps(CONFIG))
    return path


def test_auto_reads_the_model_directory(model_dir):
    defaults = read_generation_defaults(model_dir)
    assert defaults.values() == {
        "temperature": 0.6, "top_p": 0.8, "top_k": 3, "min_p": 0.0, "repetition_penalty": 1.2,
    }  # fmt: skip
    assert defaults.source == str(model_dir / "generation_config.json")


def test_none_and_path(model_dir, tmp_path):
    assert read_generation_defaults(model_dir, "none") == GenerationDefaults()
    assert read_generation_defaults(model_dir, "none").is_builtin
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.3, "min_p": 0.05}))
    other = read_generation_defaults(model_dir, str(tmp_path))
    assert (other.temperature, other.top_k, other.min_p) == (0.3, 0, 0.05)
    with pytest.raises(GptServeError, match="no generation_config.json"):
        read_generation_defaults(model_dir, str(tmp_path / "missing"))


def test_greedy_config_and_bad_values(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.9}))
    assert read_generation_defaults(tmp_path).temperature == 0.0
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 0.0}))
    with pytest.raises(GptServeError, match="top_p"):
        read_generation_defaults(tmp_path)


def test_embedded_model_takes_its_card_values():
    assert read_generation_defaults(None) == SMOLLM2_CARD_DEFAULTS
    assert (SMOLLM2_CARD_DEFAULTS.temperature, SMOLLM2_CARD_DEFAULTS.top_p) == (0.2, 0.9)


def test_llm_generates_with_the_model_defaults(model_dir):
    llm = LLM(model_dir, dtype="fp32", kv_cache_memory="8MiB")
    plain = LLM(model_dir, dtype="fp32", kv_cache_memory="8MiB", generation_config="none")
    try:
        explicit = SamplingParams(temperature=0.6, top_p=0.8, top_k=3, repetition_penalty=1.2)
        assert llm.get_default_sampling_params() == explicit
        assert plain.get_default_sampling_params() == SamplingParams()
        prompt = [3, 14, 15, 92, 65]
        seeded = {"seed": 5, "max_tokens": 24}
        (from_model,) = llm.generate(prompt, replace(llm.get_default_sampling_params(), **seeded))
        (as_set,) = plain.generate(prompt, replace(explicit, **seeded))
        (unset,) = plain.generate(prompt, replace(plain.get_default_sampling_params(), **seeded))
        assert from_model.outputs[0].token_ids == as_set.outputs[0].token_ids
        assert from_model.outputs[0].token_ids != unset.outputs[0].token_ids
    finally:
        llm.close()
        plain.close()


def test_convert_keeps_the_generation_config(model_dir, tmp_path):
    from gptserve.cli import main

    assert main(["convert", str(model_dir), str(tmp_path / "converted")]) == 0
    assert (
        read_generation_defaults(tmp_path / "converted").values()
        == read_generation_defaults(model_dir).values()
    )


def test_a_generation_config_with_only_token_ids_recommends_nothing():
    """transformers writes such a file beside every model it saves: the Triton text form stays greedy."""
    from gptserve.generation_defaults import GenerationDefaults

    written = {"_from_model_config": True, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    assert GenerationDefaults.from_generation_config(written, "generation_config.json").is_builtin
    greedy = GenerationDefaults.from_generation_config({"do_sample": False}, "generation_config.json")
    assert not greedy.is_builtin and greedy.temperature == 0.0
