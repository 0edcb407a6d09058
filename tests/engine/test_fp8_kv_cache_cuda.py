"""`--kv-cache-dtype fp8` on a GPU: the Triton KV writes store the bf16 K and V rounded to fp8, the paged
decode kernel (inside CUDA graphs) and the prefill over a cached prefix read them back, and decoding stays
close to a bf16 cache (GPU of compute capability 8.9+ only)."""

from __future__ import annotations

import pytest
import torch

from gptserve import LLM, SamplingParams
from tests.conftest import random_prompts
from tests.engine.test_fp8_kv_cache import assert_first_decode_close

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
        reason="needs a GPU of compute capability 8.9+",
    ),
]

ENGINE = dict(device="cuda", dtype="bf16", max_model_len=128, kv_cache_memory="64MiB")


@pytest.mark.parametrize("arch", ["gptj", "llama"])
def test_fp8_cache_on_cuda(tiny_models, arch):
    path, _ = tiny_models[arch]
    full = LLM(str(path), enable_prefix_caching=False, **ENGINE)
    fp8 = LLM(str(path), kv_cache_dtype="fp8", enable_prefix_caching=False, **ENGINE)
    prompts = random_prompts(3, 100, [5, 20, 9], seed=2)
    first = SamplingParams(max_tokens=1, temperature=0, logprobs=5)
    for x, y in zip(full.generate(prompts, first), fp8.generate(prompts, first)):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
    for layer_full, layer_fp8 in zip(full.engine.runner.layers, fp8.engine.runner.layers):
        blocks = layer_full.kv_cache.shape[1]
        written = layer_fp8.kv_cache[:, :blocks].to(torch.bfloat16)
        expected = layer_full.kv_cache.to(torch.float8_e4m3fn).to(torch.bfloat16)
        torch.testing.assert_close(written, expected, rtol=0.07, atol=1e-3)  # one fp8 step at most
    assert_first_decode_close(full, fp8, prompts, 6)  # decode steps replayed from graphs
    assert fp8.engine.runner.graphs is not None and fp8.engine.runner.graphs.replays["decode"] > 0
    for llm in (full, fp8):
        assert llm.engine.core.kv.num_free_blocks == llm.engine.core.kv.num_blocks
        llm.close()


def test_fp8_cache_prefix_hit_reads_the_cache(tiny_models):
    """A prompt whose prefix is cached attends to the fp8 K and V of that prefix (read back as bf16)."""
    path, _ = tiny_models["llama"]
    llm = LLM(str(path), kv_cache_dtype="fp8", **ENGINE)
    prompt = random_prompts(1, 100, [40], seed=3)[0]
    params = SamplingParams(max_tokens=4, temperature=0, logprobs=3, ignore_eos=True)
    cold = llm.generate([prompt], params)[0]
    warm = llm.generate([prompt], params)[0]
    assert warm.num_cached_tokens >= 32
    first_cold, first_warm = dict(cold.outputs[0].logprobs[0].top), dict(warm.outputs[0].logprobs[0].top)
    shared = first_cold.keys() & first_warm.keys()
    assert shared and max(abs(first_cold[t] - first_warm[t]) for t in shared) < 0.5
    assert llm.engine.core.kv.num_free_blocks == llm.engine.core.kv.num_blocks
    llm.close()
