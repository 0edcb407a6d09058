"""Stop strings end generation through the engine, matched across token boundaries, never emitted."""

from __future__ import annotations

import pytest

from gptserve import LLM, SamplingParams

QUESTION = "Describe the sea in two sentences."


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu", max_model_len=1024)


@pytest.fixture(scope="module")
def prompt(llm):
    messages = [{"role": "user", "content": QUESTION}]
    return llm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@pytest.fixture(scope="module")
def greedy(llm, prompt):
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True))[0]
    return out.outputs[0]


def _spanning_stop(llm, token_ids: list[int]) -> tuple[str, str]:
    """A stop string that starts inside one token and ends inside the next, and the text before it."""
    tok = llm.tokenizer
    pieces = [tok.decode(token_ids[:i]) for i in range(len(token_ids) + 1)]
    for i in range(3, len(token_ids) - 1):
        a, b = pieces[i], pieces[i + 1]
        if len(a) - len(pieces[i - 1]) >= 2 and len(b) - len(a) >= 2:
            stop = a[-1] + b[len(a)]
            start = pieces[-1].find(stop)
            if start >= 0:
                return stop, pieces[-1][:start]
    raise AssertionError("no token boundary suitable for the test")


def test_stop_string_spanning_tokens(llm, greedy, prompt):
    stop, expected = _spanning_stop(llm, greedy.token_ids)
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True, stop=[stop])
    out = llm.generate(prompt, params)[0].outputs[0]
    assert out.text == expected
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert llm.engine.core.kv.num_free_blocks == llm.engine.core.kv.num_blocks


def test_include_stop_str_in_output(llm, greedy, prompt):
    stop, expected = _spanning_stop(llm, greedy.token_ids)
    params = SamplingParams(
        temperature=0.0, max_tokens=48, ignore_eos=True, stop=[stop], include_stop_str_in_output=True
    )
    assert llm.generate(prompt, params)[0].outputs[0].text == expected + stop


def test_stop_token_ids_and_max_tokens(llm, greedy, prompt):
    target = greedy.token_ids[5]
    first = greedy.token_ids.index(target)
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=48, stop_token_ids=[target]))[0]
    assert out.outputs[0].token_ids == greedy.token_ids[: first + 1]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == target
    short = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))[0]
    assert short.outputs[0].token_ids == greedy.token_ids[:3] and short.outputs[0].finish_reason == "length"


def test_min_tokens_holds_back_eos(llm):
    chat = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say OK."}], tokenize=False, add_generation_prompt=True
    )
    free = llm.generate(chat, SamplingParams(temperature=0.0, max_tokens=64))[0].outputs[0]
    assert free.finish_reason == "stop"  # the model ends its answer with an end token
    held = llm.generate(
        chat, SamplingParams(temperature=0.0, max_tokens=64, min_tokens=len(free.token_ids) + 3)
    )
    assert len(held[0].outputs[0].token_ids) >= len(free.token_ids) + 3


def test_text_is_incremental_detokenization(llm, greedy):
    assert greedy.text == llm.tokenizer.decode(greedy.token_ids, skip_special_tokens=True)
