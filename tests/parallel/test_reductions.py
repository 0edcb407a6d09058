"""All-reduces per forward pass of one rank in a world of two: two per block (attention output, MLP
output), one per block where the residual is parallel (GPT-J, GPT-NeoX: x + attn + mlp reduces the sum
once), and one for the vocabulary-parallel embedding."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from gptserve.config import ModelConfig
from gptserve.models.registry import model_class
from gptserve.parallel import parallel_state
from tests.helpers import TINY_CONFIGS

PER_BLOCK = {"llama": 2, "gpt2": 2, "gptj": 1, "gpt_neox": 1}


@pytest.mark.parametrize("arch", list(PER_BLOCK))
def test_all_reduces_per_forward(arch, monkeypatch):
    kwargs = dict(TINY_CONFIGS[arch])
    config = ModelConfig.from_hf(AutoConfig.for_model(kwargs.pop("model_type"), **kwargs).to_dict())
    calls = []
    monkeypatch.setattr(parallel_state, "all_reduce", lambda x: calls.append(tuple(x.shape)) or x)
    with parallel_state.assumed_world(2), torch.device("meta"):
        net = model_class(config)(config)
        net(torch.zeros(3, dtype=torch.long), torch.arange(3))
    assert len(calls) == PER_BLOCK[arch] * config.num_layers + 1
    assert all(shape == (3, config.hidden_size) for shape in calls)
