"""`prompt_logprobs`: the log-probability of every prompt token after the first equals Hugging Face's
log-softmax of the prompt's logits (fp32), with chunked prefill, beside other traffic, after a prefix
cache hit would have been possible, and with `max_tokens=0` (the prompt scored, nothing generated)."""

from __future__ import annotations

import pytest
import torch

from gptserve import LLM, SamplingParams
from tests.conftest import random_prompts


def hf_prompt_logprobs(model: torch.nn.Module, prompt: list[int]) -> torch.Tensor:
    """[len(prompt) - 1, vocab]: row j is the log-softmax of the logits that predict prompt[j + 1]."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].float()
    return torch.log_softmax(logits[:-1], dim=-1)


def check(out, prompt: list[int], ref: torch.Tensor, k: int) -> None:
    got = out.prompt_logprobs
    assert got is not None and len(got) == len(prompt) and got[0] is None
    for j, entry in enumerate(got[1:]):
        assert entry.token_id == prompt[j + 1]
        assert abs(entry.logprob - ref[j, prompt[j + 1]].item()) < 1e-4
        top = ref[j].topk(k)
        assert [t for t, _ in entry.top] == top.indices.tolist()
        assert all(abs(v - r) < 1e-4 for (_, v), r in zip(entry.top, top.values.tolist()))


@pytest.fixture(scope="module")
def llama(tiny_models):
    path, hf_model = tiny_models["llama"]
    llm = LLM(str(path), dtype="fp32", device="cpu", max_num_batched_tokens=16, block_size=4)
    return llm, hf_model


def test_prompt_logprobs_match_transformers_with_chunked_prefill(llama):
    llm, hf_model = llama
    prompts = random_prompts(3, hf_model.config.vocab_size, [5, 37, 20], seed=4)
    params = SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=3, ignore_eos=True)
    plain = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    outs = llm.generate(prompts + prompts[:1], [params] * 3 + [plain])  # budget 16: prompts are chunked
    for prompt, out in zip(prompts, outs):
        check(out, prompt, hf_prompt_logprobs(hf_model, prompt), 3)
    assert outs[3].prompt_logprobs is None
    assert [o.outputs[0].token_ids for o in outs[:1]] == [outs[3].outputs[0].token_ids]
    kv = llm.engine.core.kv
    assert kv.num_free_blocks == kv.num_blocks


def test_a_cached_prefix_is_recomputed_for_its_logprobs(llama):
    llm, hf_model = llama
    (prompt,) = random_prompts(1, hf_model.config.vocab_size, [30], seed=6)
    llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=2))  # its blocks are now cached
    (out,) = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=0))
    check(out, prompt, hf_prompt_logprobs(hf_model, prompt), 0)
    assert out.num_cached_tokens == 0


def test_max_tokens_zero_scores_the_prompt_only(llama):
    llm, hf_model = llama
    (prompt,) = random_prompts(1, hf_model.config.vocab_size, [12], seed=8)
    (out,) = llm.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=1))
    check(out, prompt, hf_prompt_logprobs(hf_model, prompt), 1)
    completion = out.outputs[0]
    assert completion.token_ids == [] and completion.finish_reason == "length" and out.finished


def test_max_tokens_zero_needs_prompt_logprobs():
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)
