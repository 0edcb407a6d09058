"""Triton models over a real engine: FT's GPT-J repository on a tiny random GPT-J, checked against
Hugging Face (greedy and beam continuations, log-probs), word lists, streaming and cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import time

import numpy as np
import pytest
import torch

from gptserve.engine.engine_options import EngineOptions
from gptserve.triton.registry import ModelRegistry
from gptserve.triton.tokenizer_models import load_gpt2_bpe
from gptserve.triton.types import InferRequest, TritonError
from tests.conftest import build_tiny_model, hf_greedy, random_prompts
from tests.triton.ft_repository import write_gptj_repository

END_ID = 50256
VOCAB = 50400


@pytest.fixture(scope="module")
def setup(tiny_gptj, tmp_path_factory):
    """(registry, HF model, GPT-2 tokenizer, event loop) with the registry started on the loop."""
    root = tmp_path_factory.mktemp("ft-gptj")
    checkpoint, hf = tiny_gptj
    repository = write_gptj_repository(root / "models", checkpoint)
    options = EngineOptions(device="cpu", dtype="fp32", num_kv_blocks=64, max_model_len=128)
    registry = ModelRegistry([repository], options)
    registry.load_all()
    loop = asyncio.new_event_loop()
    loop.run_until_complete(registry.start())
    tokenizer = load_gpt2_bpe(repository / "preprocessing" / "1")
    yield registry, hf, tokenizer, loop
    loop.run_until_complete(registry.stop())
    loop.close()


@contextlib.contextmanager
def decoupled(model):
    """`model` as if its config were decoupled (streaming the requests that ask): a model whose config is
    not decoupled answers every request once, as Triton's do."""
    policy = model.config.model_transaction_policy
    before = policy.decoupled, model.streams_on_request
    policy.decoupled, model.streams_on_request = True, True
    try:
        yield model
    finally:
        policy.decoupled, model.streams_on_request = before


def run(loop, coro):
    return loop.run_until_complete(asyncio.wait_for(coro, 120))


def u32(rows):
    return np.array(rows, dtype=np.uint32)


def token_request(prompts, output_len, **scalars) -> InferRequest:
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), END_ID, dtype=np.uint32)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    inputs = {
        "input_ids": ids,
        "input_lengths": u32([[len(p)] for p in prompts]),
        "request_output_len": u32([[output_len]] * len(prompts)),
        "end_id": u32([[END_ID]] * len(prompts)),
    }
    inputs.update(scalars)
    return InferRequest("fastertransformer", inputs=inputs)


def wait_kv_free(engine, timeout: float = 10.0) -> None:
    core = engine.core
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if core.kv.usage == 0 and not core.requests:
            return
        time.sleep(0.02)
    raise AssertionError(f"KV cache still in use: {core.kv.usage}, requests {list(core.requests)}")


def test_repository_index(setup):
    registry, *_ = setup
    index = {row["name"]: row for row in registry.index()}
    assert set(index) == {"ensemble", "fastertransformer", "postprocessing", "preprocessing"}
    assert all(row["state"] == "READY" and row["version"] == "1" for row in index.values()), index
    assert registry.ready


def test_fastertransformer_greedy_matches_hf_for_ragged_batch(setup):
    registry, hf, _, loop = setup
    model = registry.get("fastertransformer")
    prompts = random_prompts(3, END_ID, [5, 3, 7], seed=1)
    response = run(loop, model.infer(token_request(prompts, 6)))
    ids, lengths = response.output("output_ids"), response.output("sequence_length")
    assert ids.dtype == np.uint32 and ids.shape == (3, 1, 7 + 6)
    assert lengths.shape == (3, 1)
    for b, prompt in enumerate(prompts):
        expected, _ = hf_greedy(hf, prompt, 6)
        assert END_ID not in expected
        n = int(lengths[b, 0])
        assert n == len(prompt) + 6
        assert ids[b, 0, :n].tolist() == prompt + expected
        assert (ids[b, 0, n:] == END_ID).all()
    assert model.stats.inference_count >= 3 and model.stats.execution_count >= 1


def test_log_probs_match_hf_and_sum_to_cum(setup):
    registry, hf, _, loop = setup
    prompts = random_prompts(2, END_ID, [4, 6], seed=2)
    request = token_request(prompts, 5, is_return_log_probs=np.array([[True], [True]]))
    response = run(loop, registry.get("fastertransformer").infer(request))
    cum, per_token = response.output("cum_log_probs"), response.output("output_log_probs")
    assert cum.shape == (2, 1) and per_token.shape == (2, 1, 5) and per_token.dtype == np.float32
    np.testing.assert_allclose(cum[:, 0], per_token[:, 0].sum(-1), rtol=1e-5, atol=1e-5)
    for b, prompt in enumerate(prompts):
        tokens, logprobs = hf_greedy(hf, prompt, 5)
        reference = logprobs[torch.arange(5), torch.tensor(tokens)].numpy()
        np.testing.assert_allclose(per_token[b, 0], reference, atol=1e-3)


def test_ensemble_end_to_end_gives_hf_greedy_text(setup):
    registry, hf, tokenizer, loop = setup
    queries = ["Blackhawks\n The 2015 Hilltoppers", "Hello world"]
    request = InferRequest(
        "ensemble",
        inputs={
            "INPUT_0": np.array([[q.encode()] for q in queries], dtype=object),
            "INPUT_1": u32([[5], [5]]),
            "INPUT_2": np.array([[b""], [b""]], dtype=object),
            "INPUT_3": np.array([[b""], [b""]], dtype=object),
            "runtime_top_k": u32([[1], [1]]),
            "end_id": u32([[END_ID], [END_ID]]),
            "is_return_log_probs": np.array([[True], [True]]),
        },
    )
    response = run(loop, registry.get("ensemble").infer(request))
    texts = response.output("OUTPUT_0")
    assert texts.shape == (2,)  # FT's postprocessing: one flat string per beam
    for b, query in enumerate(queries):
        prompt = tokenizer.encode(query)
        generated, _ = hf_greedy(hf, prompt, 5)
        expected = tokenizer.decode(prompt + generated, skip_special_tokens=True)
        assert texts[b].decode().replace("<|endoftext|>", "") == expected  # padding decoded too
        assert int(response.output("sequence_length")[b, 0]) == len(prompt) + 5
    assert response.output("cum_log_probs").shape == (2, 1)


def test_bad_words_are_never_produced(setup):
    registry, hf, _, loop = setup
    prompt = random_prompts(1, END_ID, [5], seed=3)[0]
    greedy, _ = hf_greedy(hf, prompt, 8)
    banned = [[greedy[0]], [greedy[2]]]
    words = np.array([[[greedy[0], greedy[2]], [1, 2]]], dtype=np.int32)
    response = run(
        loop, registry.get("fastertransformer").infer(token_request([prompt], 8, bad_words_list=words))
    )
    generated = response.output("output_ids")[0, 0, len(prompt) :].tolist()
    assert generated != greedy
    assert not {w[0] for w in banned} & set(generated)


def test_stop_words_stop_generation(setup):
    registry, hf, _, loop = setup
    prompt = random_prompts(1, END_ID, [6], seed=4)[0]
    greedy, _ = hf_greedy(hf, prompt, 8)
    stop = np.array([[[greedy[2], greedy[3]], [2, -1]]], dtype=np.int32)
    response = run(
        loop, registry.get("fastertransformer").infer(token_request([prompt], 8, stop_words_list=stop))
    )
    n = int(response.output("sequence_length")[0, 0])
    ids = response.output("output_ids")[0, 0]
    assert n == len(prompt) + 4
    assert ids[:n].tolist() == prompt + greedy[:4]
    assert (ids[n:] == END_ID).all()


def test_beam_width_2_matches_hf_beam_search(setup):
    registry, hf, _, loop = setup
    prompt = random_prompts(1, END_ID, [5], seed=5)[0]
    request = token_request([prompt], 4, beam_width=u32([[2]]), is_return_log_probs=np.array([True]))
    response = run(loop, registry.get("fastertransformer").infer(request))
    ids, lengths = response.output("output_ids"), response.output("sequence_length")
    assert ids.shape == (1, 2, 5 + 4) and lengths.shape == (1, 2)
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=4,
            num_beams=2,
            num_return_sequences=2,
            do_sample=False,
        )
    assert ids[0, 0, : int(lengths[0, 0])].tolist() == out[0].tolist()
    assert {tuple(ids[0, k, : int(lengths[0, k])].tolist()) for k in range(2)} == {
        tuple(s.tolist()) for s in out
    }
    cum, per_token = response.output("cum_log_probs"), response.output("output_log_probs")
    assert cum.shape == (1, 2) and cum[0, 0] >= cum[0, 1]
    assert per_token.shape == (1, 2, 4) and (per_token < 0).all()
    np.testing.assert_allclose(per_token[0].sum(-1), cum[0], rtol=1e-5, atol=1e-5)


def hf_beam_search(hf, prompt, new_tokens, **kwargs):
    """HF's two beams with each token's log-prob (its per-step beam score)."""
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=new_tokens,
            num_beams=2,
            num_return_sequences=2,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            **kwargs,
        )
    scores = hf.compute_transition_scores(out.sequences, out.scores, out.beam_indices)
    return out.sequences[:, len(prompt) :].tolist(), scores.numpy()


def test_beam_log_probs_match_hf(setup):
    registry, hf, _, loop = setup
    prompt = random_prompts(1, END_ID, [6], seed=7)[0]
    request = token_request([prompt], 5, beam_width=u32([[2]]), is_return_log_probs=np.array([True]))
    response = run(loop, registry.get("fastertransformer").infer(request))
    beams, scores = hf_beam_search(hf, prompt, 5)
    ids, per_token = response.output("output_ids"), response.output("output_log_probs")
    assert [ids[0, k, len(prompt) :].tolist() for k in range(2)] == beams
    np.testing.assert_allclose(per_token[0], scores, atol=1e-4)
    np.testing.assert_allclose(response.output("cum_log_probs")[0], scores.sum(-1), atol=1e-4)


def test_beam_bad_words_and_repetition_penalty_match_hf(setup):
    registry, hf, _, loop = setup
    prompt = random_prompts(1, END_ID, [6], seed=7)[0]
    plain, _ = hf_beam_search(hf, prompt, 6)
    bad = [[plain[0][0]], [plain[0][2], plain[0][3]]]
    words = np.array([[[bad[0][0], bad[1][0], bad[1][1]], [1, 3, -1]]], dtype=np.int32)
    request = token_request(
        [prompt],
        6,
        beam_width=u32([[2]]),
        bad_words_list=words,
        repetition_penalty=np.array([[1.5]], dtype=np.float32),
        is_return_log_probs=np.array([True]),
    )
    response = run(loop, registry.get("fastertransformer").infer(request))
    beams, _ = hf_beam_search(hf, prompt, 6, bad_words_ids=bad, repetition_penalty=1.5)
    assert beams != plain
    ids = response.output("output_ids")
    assert [ids[0, k, len(prompt) :].tolist() for k in range(2)] == beams
    per_token, cum = response.output("output_log_probs"), response.output("cum_log_probs")
    np.testing.assert_allclose(per_token[0].sum(-1), cum[0], rtol=1e-5, atol=1e-5)
    wait_kv_free(registry.get("fastertransformer").engine.engine)


def test_decoupled_stream_sends_full_ids_each_step(setup):
    registry, hf, _, loop = setup
    model = registry.get("fastertransformer")
    prompt = random_prompts(1, END_ID, [4], seed=6)[0]
    request = token_request([prompt], 4)
    request.parameters["stream"] = True

    async def collect():
        return [r async for r in model.stream(request)]

    with decoupled(model):
        responses = run(loop, collect())
    assert len(responses) >= 2 and responses[-1].final and not any(r.final for r in responses[:-1])
    lengths = [int(r.output("sequence_length")[0, 0]) for r in responses]
    assert lengths == sorted(lengths) and lengths[-1] == len(prompt) + 4
    expected, _ = hf_greedy(hf, prompt, 4)
    for r in responses:
        n = int(r.output("sequence_length")[0, 0])
        assert r.output("output_ids").shape == (1, 1, 8)
        assert r.output("output_ids")[0, 0, :n].tolist() == (prompt + expected)[:n]


def test_closed_stream_frees_kv_blocks(setup):
    registry, _, _, loop = setup
    model = registry.get("fastertransformer")
    prompts = random_prompts(2, END_ID, [5, 9], seed=7)
    request = token_request(prompts, 100)
    request.parameters["stream"] = True

    async def first_then_close():
        stream = model.stream(request)
        first = await anext(stream)
        await stream.aclose()
        return first

    with decoupled(model):
        first = run(loop, first_then_close())
    assert not first.final
    wait_kv_free(model.engine.engine)


def test_cancelled_infer_frees_kv_blocks(setup):
    registry, _, _, loop = setup
    model = registry.get("fastertransformer")
    failures = model.stats.fail.count

    async def cancel_midway():
        task = asyncio.ensure_future(model.infer(token_request(random_prompts(3, END_ID, [6], seed=8), 100)))
        await asyncio.sleep(0.3)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    run(loop, cancel_midway())
    wait_kv_free(model.engine.engine)
    assert model.stats.fail.count == failures + 1


def test_engine_refusal_is_a_400(setup):
    registry, _, _, loop = setup
    model = registry.get("fastertransformer")
    too_big = token_request([[VOCAB + 5]], 2)
    with pytest.raises(TritonError, match="outside the vocabulary") as info:
        run(loop, model.infer(too_big))
    assert info.value.status == 400
    with pytest.raises(TritonError, match="unexpected inference input 'bogus'"):
        run(loop, model.infer(token_request([[1, 2]], 2, bogus=u32([1]))))
    wait_kv_free(model.engine.engine)


def test_served_model_token_and_text_forms(setup, tmp_path):
    registry, hf, tokenizer, loop = setup
    engine = registry.get("fastertransformer").engine
    served = registry.add_llm("tiny-gptj", engine)
    assert all(spec.optional for spec in served.inputs)
    assert {"text_input", "max_tokens", "stream", "input_ids", "runtime_top_k"} <= {
        s.name for s in served.inputs
    }
    prompt = random_prompts(1, END_ID, [5], seed=9)[0]
    request = InferRequest("tiny-gptj", inputs={"input_ids": u32([prompt]), "request_output_len": u32([3])})
    response = run(loop, served.infer(request))
    expected, _ = hf_greedy(hf, prompt, 3)
    assert response.output("output_ids")[0, 0].tolist() == prompt + expected
    text = InferRequest("tiny-gptj", inputs={"text_input": np.array([[b"hi"]], dtype=object)})
    with pytest.raises(TritonError, match="no tokenizer") as info:
        run(loop, served.infer(text))
    assert info.value.status == 400


def test_served_text_form_streams_deltas(tmp_path):
    from gptserve.engine.builder import build_engine
    from gptserve.frontend.async_engine import AsyncEngine
    from gptserve.triton.llm_model import LLMModel
    from tests.conftest import gpt2_tokenizer

    hf = build_tiny_model("gptj", tmp_path, vocab_size=VOCAB)
    tokenizer = gpt2_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    engine = AsyncEngine(build_engine(tmp_path, EngineOptions(device="cpu", dtype="fp32", num_kv_blocks=32)))
    model = LLMModel.served("tiny", engine)
    prompt = "Machine learning is"
    ids = tokenizer.encode(prompt)
    generated, _ = hf_greedy(hf, ids, 4)
    expected = tokenizer.decode(generated, skip_special_tokens=True)

    def text_request(**inputs):
        base = {
            "text_input": np.array([[prompt.encode()]], dtype=object),
            "max_tokens": np.array([[4]], np.int32),
        }
        return InferRequest("tiny", inputs={**base, **inputs})

    async def scenario():
        engine.start()
        try:
            full = await model.infer(text_request())
            streamed = [r async for r in model.stream(text_request(stream=np.array([[True]])))]
            only_new = await model.infer(text_request(exclude_input_in_output=np.array([[True]])))
        finally:
            await engine.stop()
        return full, streamed, only_new

    full, streamed, only_new = asyncio.run(scenario())
    assert full.output("text_output").tolist() == [[(prompt + expected).encode()]]
    assert only_new.output("text_output").tolist() == [[expected.encode()]]
    assert len(streamed) >= 2 and streamed[-1].final
    assert b"".join(r.output("text_output")[0, 0] for r in streamed).decode() == expected


def test_ensemble_streams_when_asked(setup):
    registry, _, _, loop = setup
    inputs = {
        "INPUT_0": np.array([[b"Hello world"]], dtype=object),
        "INPUT_1": u32([[3]]),
        "INPUT_2": np.array([[b""]], dtype=object),
        "INPUT_3": np.array([[b""]], dtype=object),
    }
    ensemble = registry.get("ensemble")
    whole = run(loop, ensemble.infer(InferRequest("ensemble", inputs=inputs)))
    request = InferRequest("ensemble", inputs=inputs, parameters={"stream": True})

    async def collect():
        return [r async for r in ensemble.stream(request)]

    with decoupled(registry.get("fastertransformer")):
        responses = run(loop, collect())
    assert len(responses) >= 2 and responses[-1].final and not responses[0].final
    assert responses[-1].output("OUTPUT_0").tolist() == whole.output("OUTPUT_0").tolist()
