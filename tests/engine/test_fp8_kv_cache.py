"""`--kv-cache-dtype fp8`: the cache holds float8 e4m3 K and V (four times the tokens of a float32 cache in
the same memory), what a prompt writes is exactly the float32 values rounded to fp8, decoding reads them
back, copy-on-write of shared blocks works on the byte view, and every block comes back."""

from __future__ import annotations

import argparse

import pytest
import torch

from gptserve import LLM, SamplingParams
from gptserve.cli import add_engine_args, engine_options
from gptserve.engine.engine_options import kv_cache_dtype
from gptserve.errors import GptServeError
from tests.conftest import random_prompts

ENGINE = dict(
    device="cpu", dtype="fp32", max_model_len=96, kv_cache_memory="8MiB", enable_prefix_caching=False
)


@pytest.fixture(scope="module")
def llms(tiny_models):
    path, _ = tiny_models["gptj"]
    return LLM(str(path), **ENGINE), LLM(str(path), kv_cache_dtype="fp8", **ENGINE)


def test_fp8_cache_holds_four_times_the_tokens_of_float32(llms):
    full, fp8 = llms
    assert fp8.engine.runner.layers[0].kv_cache.dtype == torch.float8_e4m3fn
    assert fp8.engine.core.kv.num_blocks == 4 * full.engine.core.kv.num_blocks


def test_prompts_are_cached_as_their_fp8_rounding_and_decoded(llms):
    full, fp8 = llms
    prompts = random_prompts(3, 100, [5, 20, 9], seed=2)
    first = SamplingParams(max_tokens=1, temperature=0, logprobs=5)
    a, b = full.generate(prompts, first), fp8.generate(prompts, first)
    for x, y in zip(a, b):  # the prompt's attention reads its own K and V, not the cache
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
    # Both engines put the prompts in the same blocks; what they wrote is the same K and V, rounded.
    for layer_full, layer_fp8 in zip(full.engine.runner.layers, fp8.engine.runner.layers):
        blocks = layer_full.kv_cache.shape[1]
        expected = layer_full.kv_cache.to(torch.float8_e4m3fn)
        assert torch.equal(layer_fp8.kv_cache[:, :blocks].view(torch.uint8), expected.view(torch.uint8))
    # Decoding over the fp8 cache stays close to the float32 cache's distribution (3 mantissa bits).
    assert_first_decode_close(full, fp8, prompts, 2)


def assert_first_decode_close(full: LLM, fp8: LLM, prompts: list[list[int]], max_tokens: int) -> None:
    """The first decode step's top log-probabilities over an fp8 cache are within 0.5 nats of those over
    the full-precision cache, for prompts whose first tokens agree."""
    more = SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=5, ignore_eos=True)
    for x, y in zip(full.generate(prompts, more), fp8.generate(prompts, more)):
        if x.outputs[0].token_ids[0] == y.outputs[0].token_ids[0]:
            top_x, top_y = dict(x.outputs[0].logprobs[1].top), dict(y.outputs[0].logprobs[1].top)
            shared = top_x.keys() & top_y.keys()
            assert shared and max(abs(top_x[t] - top_y[t]) for t in shared) < 0.5


def test_shared_blocks_copy_on_write_and_every_block_returns(llms):
    _, fp8 = llms
    engine = fp8.engine
    layer = engine.runner.layers[0]
    copies = []

    def counting(src, dst, copy=layer.copy_blocks):
        copies.append(len(src))
        copy(src, dst)

    layer.copy_blocks = counting
    try:
        params = SamplingParams(n=3, temperature=0.9, seed=4, max_tokens=20, ignore_eos=True)
        out = fp8.generate(random_prompts(2, 100, [13, 30], seed=5), params)  # forks share a partial block
    finally:
        del layer.copy_blocks
    assert copies and all(len(c.token_ids) == 20 for o in out for c in o.outputs)
    assert engine.core.kv.num_free_blocks == engine.core.kv.num_blocks


def test_kv_cache_dtype_flag_and_values():
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert engine_options(parser.parse_args([])).kv_cache_dtype == "auto"
    assert engine_options(parser.parse_args(["--kv-cache-dtype", "fp8"])).kv_cache_dtype == "fp8"
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-cache-dtype", "int4"])
    cpu = torch.device("cpu")
    assert kv_cache_dtype("auto", torch.bfloat16, cpu) == torch.bfloat16
    assert kv_cache_dtype("fp8", torch.bfloat16, cpu) == torch.float8_e4m3fn
    with pytest.raises(GptServeError, match="auto or fp8"):
        kv_cache_dtype("fp16", torch.bfloat16, cpu)


def test_fp8_cache_keeps_the_embedded_models_greedy_answer():
    """Real weights (the embedded SmolLM2-135M-Instruct): greedy answers over an fp8 cache are the
    answers over the bf16 cache."""
    answers = []
    for kv in ("auto", "fp8"):
        llm = LLM(device="cpu", max_model_len=256, kv_cache_memory="64MiB", kv_cache_dtype=kv)
        questions = ["What is the capital of France?", "Name three primary colors."]
        prompts = [
            llm.tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
            )
            for q in questions
        ]
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16))
        answers.append([o.outputs[0].text for o in outs])
        llm.close()
    assert "Paris" in answers[0][0]
    assert answers[1] == answers[0]
