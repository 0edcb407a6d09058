"""Tensor parallelism on two GPUs over NCCL: two ranks generate what one GPU generates (graphs on one
GPU and on two, with and without asynchronous scheduling), and closing the engine ends the worker promptly
(needs 2 GPUs)."""

from __future__ import annotations

import time

import pytest
import torch

from gptserve.engine.tp_launcher import current_world
from gptserve.llm import LLM
from gptserve.outputs import CompletionOutput, TokenLogprob
from gptserve.sampling_params import SamplingParams
from tests.conftest import random_prompts
from tests.parallel.conftest import ODD_VOCAB
from tests.parallel.test_tensor_parallel import assert_close_logprobs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]

PROMPTS = random_prompts(3, ODD_VOCAB, [5, 11, 19], seed=1)
GREEDY = SamplingParams(max_tokens=16, temperature=0, logprobs=5, ignore_eos=True)


def generate(path, one_at_a_time: bool, **options) -> list[CompletionOutput]:
    llm = LLM(path, device="cuda", max_model_len=128, enable_prefix_caching=False, **options)
    try:
        if one_at_a_time:  # lone prompts: the prefill graphs run too
            outs = [llm.generate([p], GREEDY)[0].outputs[0] for p in PROMPTS]
        else:
            outs = [out.outputs[0] for out in llm.generate(PROMPTS, GREEDY)]
        return outs
    finally:
        start = time.monotonic()
        llm.close()
        assert time.monotonic() - start < 20  # the worker left by itself, nobody waited to kill it


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("arch", ["gptj", "llama"])
def test_nccl_tp2_equals_one_gpu_fp32(odd_vocab_models, arch, async_scheduling):
    """With asynchronous scheduling the ranks take rank 0's sampled tokens from a broadcast in the step."""
    path = odd_vocab_models[arch]
    ref = generate(path, False, dtype="fp32", async_scheduling=False)
    got = generate(path, False, dtype="fp32", tensor_parallel_size=2, async_scheduling=async_scheduling)
    assert current_world() is None
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    assert_close_logprobs(ref, got, atol=1e-3)


@pytest.mark.parametrize("arch", ["gptj", "llama"])
def test_nccl_tp2_lone_prompts_bf16(odd_vocab_models, arch):
    """bf16 prompts one at a time (FlashAttention varlen prefill on each rank). Rounding differs between
    one GPU and a sum of two halves, so the first token's distribution is compared: the same top tokens
    within 0.1 nats, and each picks a token the other ranks within 0.1 of its best (a tiny random model
    has near-ties that rounding may break either way)."""
    path = odd_vocab_models[arch]
    ref = generate(path, True, dtype="bf16")
    got = generate(path, True, dtype="bf16", tensor_parallel_size=2)
    for a, b in zip(ref, got):
        assert_same_first_distribution(a.logprobs[0], b.logprobs[0], 0.1)


def assert_same_first_distribution(a: TokenLogprob, b: TokenLogprob, tolerance: float) -> None:
    top_a, top_b = dict(a.top), dict(b.top)
    shared = top_a.keys() & top_b.keys()
    assert len(shared) >= len(top_a) - 1
    assert max(abs(top_a[t] - top_b[t]) for t in shared) < tolerance
    assert top_a.get(b.token_id, -float("inf")) > max(top_a.values()) - tolerance
    assert top_b.get(a.token_id, -float("inf")) > max(top_b.values()) - tolerance
