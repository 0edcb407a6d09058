"""On a GPU, Phi-3 generates what transformers generates on the same device in the same dtype, decode
steps replayed from CUDA graphs and run eagerly (GPU only), with plain RoPE and with LongRoPE below its
original length (the long-or-short table choice made on the device inside the graphs). Tolerances as in
test_cuda_parity.py."""

from __future__ import annotations

import pytest

from gptserve import LLM, SamplingParams
from tests.conftest import random_prompts
from tests.engine.test_cuda_parity import DTYPES, LENGTHS, NEW_TOKENS, _check_against_hf
from tests.tiny_phi3 import LONGROPE, build_tiny_phi3

pytestmark = pytest.mark.gpu
ROPES = {"default": {}, "longrope-short": dict(LONGROPE, original_max_position_embeddings=128)}


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["cuda-graphs", "eager"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("rope", list(ROPES))
def test_gpu_greedy_matches_transformers(rope, dtype, enforce_eager, tmp_path):
    hf_model = build_tiny_phi3(tmp_path, **ROPES[rope]).to("cuda", DTYPES[dtype])
    engine = dict(dtype=dtype, device="cuda", max_num_batched_tokens=64, enforce_eager=enforce_eager)
    llm = LLM(str(tmp_path), **engine)
    assert (llm.engine.runner.graphs is None) == enforce_eager
    prompts = random_prompts(len(LENGTHS), hf_model.config.vocab_size, LENGTHS, seed=2)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, logprobs=5, ignore_eos=True)
    try:
        outputs = llm.generate(prompts, params)
    finally:
        llm.close()
    for prompt, out in zip(prompts, outputs, strict=True):
        _check_against_hf(hf_model, prompt, out.outputs[0], dtype)
