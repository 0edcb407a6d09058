"""Asynchronous scheduling: a decode step launched before the host has its input tokens (forced on here,
on a CPU, where it is off by default) generates exactly what synchronous steps generate, for greedy and
seeded sampling, logprobs, n > 1, stop tokens that end sequences while the next step is in flight,
penalties (which fall back to synchronous steps), several lengths and aborts; every KV block comes back."""

from __future__ import annotations

import pytest

from gptserve import LLM, SamplingParams
from tests.conftest import random_prompts

ENGINE = dict(device="cpu", dtype="fp32", max_model_len=96, block_size=8, num_kv_blocks=256)


@pytest.fixture(scope="module")
def llms(tiny_models):
    path, _ = tiny_models["llama"]
    return LLM(str(path), async_scheduling=False, **ENGINE), LLM(str(path), async_scheduling=True, **ENGINE)


def _params(prompts: list[list[int]], free: list[list[int]]) -> list[SamplingParams]:
    params = []
    for i, tokens in enumerate(free):
        kind = i % 6
        if kind == 0:
            params.append(SamplingParams(temperature=0.0, max_tokens=5 + i, ignore_eos=True))
        elif kind == 1:  # ends on a token it would produce a few steps in
            params.append(SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[tokens[3 + i % 5]]))
        elif kind == 2:
            params.append(SamplingParams(temperature=0.8, top_p=0.9, seed=100 + i, max_tokens=17, logprobs=2))
        elif kind == 3:
            params.append(SamplingParams(temperature=0.7, seed=7 + i, n=2, max_tokens=12))
        elif kind == 4:  # reads the token history: these steps stay synchronous
            params.append(SamplingParams(temperature=0.0, max_tokens=14, repetition_penalty=1.3))
        else:
            params.append(SamplingParams(temperature=0.0, max_tokens=90))  # up to max_model_len
    return params


def _summary(outputs):
    return [[(c.token_ids, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outputs]


def _assert_same(got, expected):
    """Same tokens and endings; cumulative log-probs within 1e-3 (a step run ahead may carry a wasted row,
    and a float32 matmul over another number of rows may round its last bits otherwise)."""
    assert _summary(got) == _summary(expected)
    for a, b in zip(got, expected):
        for x, y in zip(a.outputs, b.outputs):
            assert x.cumulative_logprob == pytest.approx(y.cumulative_logprob, abs=1e-3)


def test_async_steps_generate_what_synchronous_steps_do(llms):
    sync, ahead = llms
    prompts = random_prompts(18, 509, [4, 9, 17, 30], seed=3)
    free = [o.outputs[0].token_ids for o in sync.generate(prompts, SamplingParams(max_tokens=10))]
    params = _params(prompts, free)
    # Together: steps run ahead while every running request's sampling reads no history.
    before = ahead.engine.core.num_steps_ahead
    counted = [llm.engine.num_generated_tokens for llm in llms]
    _assert_same(ahead.generate(prompts, params), sync.generate(prompts, params))
    assert ahead.engine.core.num_steps_ahead > before
    # the rows wasted on sequences that ended while a step ran ahead count no tokens
    assert [llm.engine.num_generated_tokens - n for llm, n in zip(llms, counted)][0] == (
        ahead.engine.num_generated_tokens - counted[1]
    )
    # The history-reading requests alone never run ahead.
    before = ahead.engine.core.num_steps_ahead
    ahead.generate(prompts[4:5], params[4:5])
    assert ahead.engine.core.num_steps_ahead == before
    # One at a time (prefill, then every decode step ahead).
    for prompt, p in list(zip(prompts, params))[:6]:
        _assert_same(ahead.generate([prompt], p), sync.generate([prompt], p))
    for llm in llms:
        assert llm.engine.core.kv.num_free_blocks == llm.engine.core.kv.num_blocks
        assert not llm.engine.has_unfinished_requests()


def test_abort_while_a_step_runs_ahead(llms):
    _, ahead = llms
    engine = ahead.engine
    greedy = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    for i, prompt in enumerate(random_prompts(3, 509, [6, 11, 5], seed=9)):
        engine.add_request(f"a{i}", prompt, greedy)
    for _ in range(4):
        engine.step()
    assert engine.core.run_ahead.pending  # a step is in flight
    engine.abort_request("a1")
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0]
    assert finished["a1"].finish_reason == "abort"
    assert len(finished["a0"].token_ids) == len(finished["a2"].token_ids) == 40
    assert engine.core.kv.num_free_blocks == engine.core.kv.num_blocks


def test_steps_run_ahead_while_requests_wait_for_a_full_running_set(tiny_models):
    """More requests than `max_num_seqs`: while the running set is full and no sequence reaches its
    length limit, no waiting request could be admitted, so steps still run ahead. Sequences ending on a
    stop token (their places go to waiting requests a step later) and by length give what synchronous
    steps give, and every block comes back."""
    path, _ = tiny_models["llama"]
    sync, ahead = (LLM(str(path), async_scheduling=flag, max_num_seqs=3, **ENGINE) for flag in (False, True))
    prompts = random_prompts(9, 509, [4, 9, 17], seed=5)
    free = [
        o.outputs[0].token_ids for o in sync.generate(prompts, SamplingParams(max_tokens=12, temperature=0))
    ]
    params = [
        SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[tokens[2 + i % 7]])
        if i % 2
        else SamplingParams(temperature=0.0, max_tokens=4 + i, ignore_eos=True)
        for i, tokens in enumerate(free)
    ]
    _assert_same(ahead.generate(prompts, params), sync.generate(prompts, params))

    engine = ahead.engine
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    for i, prompt in enumerate(prompts[:6]):
        engine.add_request(f"w{i}", prompt, greedy)
    ahead_while_waiting = 0
    while engine.core.scheduler.waiting:
        before = engine.core.num_steps_ahead
        engine.step()
        if engine.core.scheduler.waiting:  # launched while three requests still waited
            ahead_while_waiting += engine.core.num_steps_ahead - before
    assert ahead_while_waiting > 0
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.core.kv.num_free_blocks == engine.core.kv.num_blocks


def test_stop_strings_end_sequences_while_a_step_runs_ahead(tmp_path):
    """A stop string is found in the text after the step that completed it, while the next step is
    already in flight: the text, tokens and stop reason equal those of synchronous steps."""
    from tests.conftest import build_tiny_model, gpt2_tokenizer

    build_tiny_model("gpt2", tmp_path, vocab_size=50257)
    gpt2_tokenizer().save_pretrained(tmp_path)
    sync, ahead = (
        LLM(str(tmp_path), async_scheduling=flag, device="cpu", dtype="fp32", max_model_len=128)
        for flag in (False, True)
    )
    tok = sync.tokenizer
    prompts = [tok.encode(f"Story {i}: once upon a time") for i in range(12)]
    free = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    texts = [o.outputs[0].text for o in sync.generate(prompts, free)]
    params = [
        SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, stop=[t[len(t) // 2 : len(t) // 2 + 2]])
        for t in texts
    ]
    expected = [
        (c.text, c.token_ids, c.finish_reason, c.stop_reason)
        for o in sync.generate(prompts, params)
        for c in o.outputs
    ]
    before = ahead.engine.core.num_steps_ahead
    got = [
        (c.text, c.token_ids, c.finish_reason, c.stop_reason)
        for o in ahead.generate(prompts, params)
        for c in o.outputs
    ]
    assert got == expected and any(reason == "stop" for _, _, reason, _ in got)
    assert ahead.engine.core.num_steps_ahead > before
    assert ahead.engine.core.kv.num_free_blocks == ahead.engine.core.kv.num_blocks


def test_off_by_default_on_a_cpu(tiny_models):
    """On a CPU the model and the host share the cores: nothing to overlap, so auto means off."""
    path, _ = tiny_models["llama"]
    assert not LLM(str(path), **ENGINE).engine.config.scheduler.async_scheduling
