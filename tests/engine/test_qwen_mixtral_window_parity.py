"""Qwen2 with use_sliding_window (the window on layer 1 only) and Mixtral (on every layer) through the
engine: greedy tokens equal transformers' `generate` (eager attention) for prompts of different lengths
decoded together, once prompt and completion run past the window."""

from __future__ import annotations

import pytest

from gptserve import LLM, SamplingParams
from tests.conftest import hf_greedy, random_prompts
from tests.tiny_moe import build_tiny_moe
from tests.tiny_qwen import build_tiny_qwen

WINDOW = 16
NEW_TOKENS = 32
LENGTHS = [5, 13, 23, 41]


@pytest.mark.parametrize("arch", ["qwen2", "mixtral"])
def test_greedy_matches_transformers_past_the_window(arch, tmp_path):
    if arch == "mixtral":
        hf_model = build_tiny_moe(arch, tmp_path, sliding_window=WINDOW, attn_implementation="eager")
    else:
        window = dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
        hf_model = build_tiny_qwen(arch, tmp_path, **window, attn_implementation="eager")
    llm = LLM(str(tmp_path), dtype="fp32", device="cpu", max_num_batched_tokens=48)
    prompts = random_prompts(len(LENGTHS), hf_model.config.vocab_size, LENGTHS, seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    try:
        outputs = llm.generate(prompts, params)  # together: batched decode, chunked prefill (budget 48)
    finally:
        llm.close()
    for prompt, out in zip(prompts, outputs, strict=True):
        assert len(prompt) + NEW_TOKENS > WINDOW
        assert out.outputs[0].token_ids == hf_greedy(hf_model, prompt, NEW_TOKENS)[0]
