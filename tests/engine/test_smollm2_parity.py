"""On the real SmolLM2-135M-Instruct weights, greedy output equals Hugging Face's, from ids and from text."""

from __future__ import annotations

import pytest
import torch

from gptserve import LLM, SamplingParams
from gptserve.loading.default_model import default_model_path
from tests.conftest import hf_greedy

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.\n",
    "def fibonacci(n):",
]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def hf_smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # compare full-length continuations (ignore_eos on our side)
    return tokenizer, model


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="fp32", device="cpu", max_model_len=2048)


def test_tokenizer_matches_without_extra_bos(llm, hf_smollm2):
    hf_tokenizer, _ = hf_smollm2
    for prompt in PROMPTS:
        ids = llm.engine.input_processor.tokenize(prompt)
        assert ids == hf_tokenizer(prompt)["input_ids"]
        assert ids[0] != hf_tokenizer.bos_token_id


def test_greedy_tokens_match_from_ids_and_text(llm, hf_smollm2):
    hf_tokenizer, hf_model = hf_smollm2
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    ids = [hf_tokenizer(p)["input_ids"] for p in PROMPTS]
    from_ids = llm.generate(ids, params)
    from_text = llm.generate(PROMPTS, params)
    for prompt_ids, a, b in zip(ids, from_ids, from_text):
        reference, _ = hf_greedy(hf_model, prompt_ids, NEW_TOKENS)
        assert a.outputs[0].token_ids == reference
        assert b.outputs[0].token_ids == reference
        assert b.outputs[0].text == hf_tokenizer.decode(reference, skip_special_tokens=True)
