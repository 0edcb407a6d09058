"""Beam search returns what Hugging Face transformers' beam search returns."""

from __future__ import annotations

import pytest
import torch

from gptserve import LLM, SamplingParams
from tests.conftest import random_prompts


@pytest.mark.parametrize("arch", ["gptj", "llama"])
@pytest.mark.parametrize("width,length_penalty", [(2, 1.0), (4, 0.5)])
def test_beam_search_matches_transformers(arch, width, length_penalty, tiny_models):
    path, hf_model = tiny_models[arch]
    llm = LLM(str(path), dtype="fp32", device="cpu")
    for prompt in random_prompts(2, 512, [7, 19], seed=8):
        with torch.no_grad():
            ref = hf_model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                num_beams=width,
                num_return_sequences=width,
                length_penalty=length_penalty,
                max_new_tokens=12,
                do_sample=False,
            )
        params = SamplingParams(beam_width=width, n=width, length_penalty=length_penalty, max_tokens=12)
        out = llm.generate(prompt, params)[0]
        ours = [c.token_ids for c in out.outputs]
        theirs = [row[len(prompt) :].tolist() for row in ref]
        assert ours == theirs
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks
