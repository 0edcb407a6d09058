"""On a GPU, Gemma 2 and Gemma 3 generate what transformers (eager attention) generates on the same device
in the same dtype, decode steps replayed from CUDA graphs and run eagerly (GPU only): Gemma 2's
soft-capped scores go through the Triton decode kernel and, in half precision, the capped all-chunks
prefill (a captured prefill graph with CUDA graphs on); the local layers' window (16) is shorter than
the sequences. Tolerances as in test_cuda_parity.py."""

from __future__ import annotations

import pytest

from gptserve import LLM, SamplingParams
from tests.conftest import random_prompts
from tests.engine.test_cuda_parity import DTYPES, LENGTHS, NEW_TOKENS, _check_against_hf
from tests.tiny_gemma import build_tiny_gemma

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["cuda-graphs", "eager"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gpu_greedy_matches_transformers(arch, dtype, enforce_eager, tmp_path):
    hf_model = build_tiny_gemma(arch, tmp_path, num_hidden_layers=2, sliding_window=16)
    hf_model = hf_model.to("cuda", DTYPES[dtype])
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
