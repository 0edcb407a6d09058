"""A Triton + FasterTransformer repository as its users have it: the fastertransformer `config.pbtxt` with
`tensor_para_size: "2"` and `model_checkpoint_path` at a FasterTransformer `c-model/2-gpu/` directory.
gptserve reads the c-model files, runs the model on two tensor-parallel ranks (gloo on CPU) and gives the
Hugging Face greedy continuation, through the token model and through the text ensemble."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from gptserve.engine.engine_options import EngineOptions
from gptserve.engine.tp_launcher import shutdown_world
from gptserve.parallel import parallel_state
from gptserve.triton.registry import ModelRegistry
from gptserve.triton.types import InferRequest
from tests.conftest import hf_greedy, random_prompts
from tests.loading.checkpoint_writers import write_ft_cmodel
from tests.triton.ft_repository import write_gptj_repository

END_ID = 50256


@pytest.fixture(scope="module")
def served(tiny_gptj, tmp_path_factory):
    root = tmp_path_factory.mktemp("ft-cmodel")
    _, hf = tiny_gptj
    cmodel = write_ft_cmodel(hf, root / "c-model" / "2-gpu", tensor_parallel=2)
    repository = write_gptj_repository(root / "models", cmodel, tensor_para_size=2)
    options = EngineOptions(device="cpu", dtype="fp32", num_kv_blocks=64, max_model_len=128)
    registry = ModelRegistry([repository], options)
    registry.load_all()
    loop = asyncio.new_event_loop()
    loop.run_until_complete(registry.start())
    yield registry, hf, loop
    loop.run_until_complete(registry.stop())
    loop.close()
    shutdown_world()


def test_cmodel_on_two_ranks_gives_hf_greedy(served) -> None:
    registry, hf, loop = served
    assert all(row["state"] == "READY" for row in registry.index()), registry.index()
    model = registry.get("fastertransformer")
    assert parallel_state.world_size() == 2
    prompts = random_prompts(2, END_ID, [6, 4], seed=3)
    ids = np.full((2, 6), END_ID, dtype=np.uint32)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    request = InferRequest(
        "fastertransformer",
        inputs={
            "input_ids": ids,
            "input_lengths": np.array([[len(p)] for p in prompts], dtype=np.uint32),
            "request_output_len": np.array([[5], [5]], dtype=np.uint32),
        },
    )
    response = loop.run_until_complete(asyncio.wait_for(model.infer(request), 120))
    out, lengths = response.output("output_ids"), response.output("sequence_length")
    for b, prompt in enumerate(prompts):
        expected, _ = hf_greedy(hf, prompt, 5)
        assert out[b, 0, : int(lengths[b, 0])].tolist() == prompt + expected
