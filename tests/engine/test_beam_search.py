"""Beam search returns what Hugging Face transformers' beam search returns, logits processors included,
and reports per-token log-probs that add up to each beam's cumulative log-prob."""

from __future__ import annotations

import math

import pytest
import torch

from gptserve import LLM, SamplingParams
from gptserve.engine.beam_search import BeamState, beam_step
from tests.conftest import random_prompts

MAX_NEW = 12


@pytest.fixture(scope="module")
def llms(tiny_models) -> dict[str, LLM]:
    return {arch: LLM(str(tiny_models[arch][0]), dtype="fp32", device="cpu") for arch in ("gptj", "llama")}


def hf_beams(model: torch.nn.Module, prompt: list[int], width: int, **kwargs) -> list[list[int]]:
    """Hugging Face's `width` returned beams (generated ids only; cut after `eos_token_id` if given)."""
    with torch.no_grad():
        ref = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            num_beams=width,
            num_return_sequences=width,
            max_new_tokens=MAX_NEW,
            do_sample=False,
            **kwargs,
        )
    beams = [row[len(prompt) :].tolist() for row in ref]
    eos = kwargs.get("eos_token_id")
    return [b[: b.index(eos) + 1] if eos in b else b for b in beams]


def our_beams(llm: LLM, prompt: list[int], width: int, **kwargs):
    params = SamplingParams(beam_width=width, n=width, max_tokens=MAX_NEW, **kwargs)
    return llm.generate(prompt, params)[0].outputs


@pytest.mark.parametrize("arch", ["gptj", "llama"])
@pytest.mark.parametrize("width,length_penalty", [(2, 1.0), (4, 0.5)])
def test_beam_search_matches_transformers(arch, width, length_penalty, tiny_models, llms):
    _, hf_model = tiny_models[arch]
    llm = llms[arch]
    for prompt in random_prompts(2, 512, [7, 19], seed=8):
        theirs = hf_beams(hf_model, prompt, width, length_penalty=length_penalty)
        ours = our_beams(llm, prompt, width, length_penalty=length_penalty)
        assert [c.token_ids for c in ours] == theirs
    assert llm.engine.core.kv.num_free_blocks == llm.engine.core.kv.num_blocks


# Each case: (our SamplingParams, Hugging Face generate kwargs) built from the unconstrained best beam.
PROCESSOR_CASES = {
    "bad_words": lambda best: (
        {"bad_words_ids": [[best[0]], [best[2], best[3]]]},
        {"bad_words_ids": [[best[0]], [best[2], best[3]]]},
    ),
    "repetition_penalty": lambda best: ({"repetition_penalty": 1.5}, {"repetition_penalty": 1.5}),
    "repetition_reward": lambda best: ({"repetition_penalty": 0.7}, {"repetition_penalty": 0.7}),
    "logit_bias": lambda best: (
        {"logit_bias": {best[1]: 3.0, best[0]: -2.0}},
        {"sequence_bias": {(best[1],): 3.0, (best[0],): -2.0}},
    ),
    "min_tokens": lambda best: (
        {"stop_token_ids": [best[1]], "min_tokens": 4},
        {"eos_token_id": best[1], "min_new_tokens": 4},
    ),
}


@pytest.mark.parametrize("arch", ["gptj", "llama"])
@pytest.mark.parametrize("case", list(PROCESSOR_CASES))
def test_beam_logits_processors_match_transformers(arch, case, tiny_models, llms):
    """Bans, penalties, biases and min_tokens act per beam, on its log-softmax, as HF's processors do."""
    _, hf_model = tiny_models[arch]
    llm = llms[arch]
    changed = False
    for prompt in random_prompts(2, 512, [7, 19], seed=8):
        plain = hf_beams(hf_model, prompt, 4)
        ours_kwargs, hf_kwargs = PROCESSOR_CASES[case](plain[0])
        theirs = hf_beams(hf_model, prompt, 4, **hf_kwargs)
        changed |= theirs != plain
        ours = our_beams(llm, prompt, 4, **ours_kwargs)
        assert [c.token_ids for c in ours] == theirs
        for c in ours:
            for word in ours_kwargs.get("bad_words_ids", []):
                assert not any(c.token_ids[i : i + len(word)] == word for i in range(len(c.token_ids)))
    assert changed, "the processor did not change Hugging Face's beams; the case tests nothing"
    assert llm.engine.core.kv.num_free_blocks == llm.engine.core.kv.num_blocks


def test_beam_min_tokens_then_stop_token(tiny_models, llms):
    _, hf_model = tiny_models["gptj"]
    prompt = random_prompts(1, 512, [7], seed=8)[0]
    stop = hf_beams(hf_model, prompt, 4)[0][1]
    early = our_beams(llms["gptj"], prompt, 4, stop_token_ids=[stop])
    assert any(len(c.token_ids) < 4 and c.token_ids[-1] == stop for c in early)
    for c in our_beams(llms["gptj"], prompt, 4, stop_token_ids=[stop], min_tokens=4):
        assert stop not in c.token_ids[:4]
        if c.finish_reason == "stop":
            assert c.token_ids[-1] == stop and c.stop_reason == stop


@pytest.mark.parametrize("arch", ["gptj", "llama"])
def test_beam_token_logprobs_sum_to_cumulative(arch, tiny_models, llms):
    """Each beam's token log-probs are HF's per-token beam scores and add up to its cumulative log-prob."""
    _, hf_model = tiny_models[arch]
    prompt = random_prompts(1, 512, [9], seed=3)[0]
    with torch.no_grad():
        ref = hf_model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            num_beams=4,
            num_return_sequences=4,
            max_new_tokens=MAX_NEW,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    transition = hf_model.compute_transition_scores(ref.sequences, ref.scores, ref.beam_indices)
    outputs = our_beams(llms[arch], prompt, 4, logprobs=3)
    for k, c in enumerate(outputs):
        assert c.token_ids == ref.sequences[k, len(prompt) :].tolist()
        assert [lp.token_id for lp in c.logprobs] == c.token_ids
        token_logprobs = [lp.logprob for lp in c.logprobs]
        assert len(token_logprobs) == len(c.token_ids) and all(v < 0 for v in token_logprobs)
        assert sum(token_logprobs) == pytest.approx(c.cumulative_logprob, abs=1e-9)
        assert token_logprobs == pytest.approx(transition[k, : len(c.token_ids)].tolist(), abs=1e-4)
        for lp in c.logprobs:
            assert len(lp.top) == 3
            assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
            assert lp.top[0][1] >= lp.logprob - 1e-6
    # Without `logprobs` the beams report none, but their cumulative log-prob is the same.
    plain = our_beams(llms[arch], prompt, 4)
    assert all(c.logprobs is None for c in plain)
    assert [c.cumulative_logprob for c in plain] == [c.cumulative_logprob for c in outputs]


def test_beam_logprobs_are_raw_when_processors_change_scores(tiny_models, llms):
    """With a penalty, beams are ranked by processed scores but report the model's own log-probs."""
    _, hf_model = tiny_models["gptj"]
    prompt = random_prompts(1, 512, [7], seed=8)[0]
    for c in our_beams(llms["gptj"], prompt, 2, repetition_penalty=2.0, logprobs=0):
        with torch.no_grad():
            logits = hf_model(torch.tensor([prompt + c.token_ids])).logits[0].float()
        raw = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
        expected = raw[torch.arange(len(c.token_ids)), torch.tensor(c.token_ids)].tolist()
        token_logprobs = [lp.logprob for lp in c.logprobs]
        assert token_logprobs == pytest.approx(expected, abs=1e-4)
        assert all(lp.top == [] for lp in c.logprobs)
        assert sum(token_logprobs) == pytest.approx(c.cumulative_logprob, abs=1e-9)


def test_stop_token_sequence_ends_a_beam(tiny_models, llms):
    _, hf_model = tiny_models["llama"]
    prompt = random_prompts(1, 512, [7], seed=8)[0]
    best = hf_beams(hf_model, prompt, 4)[0]
    stop = best[1:3]
    outputs = our_beams(llms["llama"], prompt, 4, stop_token_sequences=[stop])
    ended = [c for c in outputs if c.token_ids[-2:] == stop]
    assert ended and all(c.finish_reason == "stop" for c in ended)
    for c in outputs:
        assert not any(c.token_ids[i : i + 2] == stop for i in range(len(c.token_ids) - 2))
    with_min = our_beams(llms["llama"], prompt, 4, stop_token_sequences=[stop], min_tokens=4)
    assert all(c.token_ids[-2:] != stop or len(c.token_ids) >= 4 for c in with_min)


def test_beam_step_never_keeps_banned_candidates():
    """A -inf score (banned token) is neither continued nor finished, even when too few are finite."""
    state = BeamState(width=2, length_penalty=1.0)
    logprobs = torch.log_softmax(torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0]]), dim=-1)
    scores = torch.full_like(logprobs, -math.inf)
    scores[0, 1] = logprobs[0, 1]
    step = beam_step(state, logprobs, scores, [0.0, -math.inf], 0, {3}, False)
    assert [(c.parent, c.token_id) for c in step.continuing] == [(0, 1)] and not step.finishing
    assert step.continuing[0].token_logprob == pytest.approx(logprobs[0, 1].item())


def test_beam_step_end_pairs_end_only_their_beam():
    state = BeamState(width=2, length_penalty=1.0)
    logprobs = torch.log_softmax(torch.tensor([[4.0, 3.0, 0.0], [4.0, 3.0, 0.0]]), dim=-1)
    step = beam_step(state, logprobs, logprobs, [0.0, -0.5], 1, set(), False, {(0, 0)})
    assert [(c.parent, c.token_id) for c, _ in step.finishing] == [(0, 0)]
    assert [(c.parent, c.token_id) for c in step.continuing] == [(1, 0), (0, 1)]
