"""`OutputProcessor`: text from token outputs, stop strings ending sequences early (and the engine told
to stop them), EOS adding no text; and the same through `AsyncEngine`, where the processor runs on the
event loop while the engine thread may already be a step further."""

from __future__ import annotations

import asyncio

import pytest

from gptserve import LLM, SamplingParams
from gptserve.engine.core_io import EngineCoreOutput, SeqDelta
from gptserve.engine.output_processor import OutputProcessor
from gptserve.frontend.async_engine import AsyncEngine
from tests.conftest import build_tiny_model, gpt2_tokenizer

EOS = 50256


def _step(request_id: str, new: dict[int, list[int]], **finish) -> EngineCoreOutput:
    """The core's news for one step: the tokens each sequence gained, and how it ended if it did."""
    seqs = [SeqDelta(i, list(ids), None, 0.0, finish.get(f"reason{i}")) for i, ids in new.items()]
    return EngineCoreOutput(request_id, seqs, finished=finish.get("finished", False))


def test_stop_string_across_tokens_truncates_and_reports_the_stop() -> None:
    tok = gpt2_tokenizer()
    ids = tok.encode("Hello world, again and again")
    processor = OutputProcessor(tok, [EOS])
    processor.add_request("r", tok.encode("Say:"), SamplingParams(stop=["o w"], max_tokens=50))
    texts, stopped_at = [], None
    for k in range(1, len(ids) + 1):
        out, stopped = processor.process(_step("r", {0: ids[k - 1 : k]}))
        assert out is not None
        texts.append(out.outputs[0].delta_text)
        if stopped:
            stopped_at = k
            break
    assert stopped == [0] and out.finished
    c = out.outputs[0]
    assert "".join(texts) == c.text == "Hell" and c.finish_reason == "stop" and c.stop_reason == "o w"
    assert c.token_ids == ids[:stopped_at]  # up to the token that completed the stop string
    assert "r" not in processor  # nothing kept for a finished request
    # The engine may report the request once more before it learns of the stop: dropped.
    assert processor.process(_step("r", {0: [ids[stopped_at]]})) == (None, [])


def test_one_of_n_stops_others_go_on_and_the_stopped_one_stays_frozen() -> None:
    tok = gpt2_tokenizer()
    a, b = tok.encode(" cat sat"), tok.encode(" dog ran far")
    processor = OutputProcessor(tok, [EOS])
    processor.add_request("r", [1, 2], SamplingParams(n=2, stop=["sat"], max_tokens=3))
    out, stopped = processor.process(_step("r", {0: a[:2], 1: b[:2]}))
    assert stopped == [0] and not out.finished
    assert out.outputs[0].text == " cat " and out.outputs[1].text == tok.decode(b[:2])
    out, stopped = processor.process(_step("r", {0: [7], 1: b[2:]}, reason1="length"))
    assert stopped == [] and out.finished
    first, second = out.outputs
    assert first.text == " cat " and first.token_ids == a[:2] and first.delta_text == ""
    assert second.text == " dog ran far" and second.finish_reason == "length"


def test_eos_adds_no_text_and_held_text_is_flushed() -> None:
    tok = gpt2_tokenizer()
    ids = tok.encode(" the end")
    processor = OutputProcessor(tok, [EOS])
    processor.add_request("r", [1], SamplingParams(stop=["end!"], max_tokens=9))
    out, _ = processor.process(_step("r", {0: ids}))
    assert out.outputs[0].text == " the "  # " end" may begin "end!": held back
    out, _ = processor.process(_step("r", {0: [EOS]}, reason0="stop", finished=True))
    assert out.finished and out.outputs[0].text == " the end" and out.outputs[0].delta_text == "end"


@pytest.fixture(scope="module")
def gpt2_llm(tmp_path_factory) -> LLM:
    path = tmp_path_factory.mktemp("tiny-gpt2-text")
    build_tiny_model("gpt2", path, vocab_size=50257)
    gpt2_tokenizer().save_pretrained(path)
    return LLM(str(path), dtype="fp32", device="cpu", max_model_len=128, num_kv_blocks=64, block_size=8)


def test_stop_string_through_async_engine_matches_offline_and_stops_the_engine(gpt2_llm: LLM) -> None:
    prompt = gpt2_llm.tokenizer.encode("Once upon a time")
    free = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    (full,) = gpt2_llm.generate([prompt], free)
    text = full.outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop])
    (offline,) = gpt2_llm.generate([prompt], params)
    expected = offline.outputs[0]
    assert expected.finish_reason == "stop" and expected.text == text[: text.index(stop)]
    before = gpt2_llm.engine.num_generated_tokens

    async def main() -> None:
        engine = AsyncEngine(gpt2_llm.engine)
        engine.start()
        try:
            outs = [o async for o in engine.generate(prompt, params, "s")]
            assert "".join(c.delta_text for o in outs for c in o.outputs) == expected.text
            last = outs[-1].outputs[0]
            assert (last.text, last.token_ids, last.stop_reason) == (
                expected.text, expected.token_ids, stop,
            )  # fmt: skip
            for _ in range(100):  # the engine learns of the stop within a step or two
                if not gpt2_llm.engine.has_unfinished_requests():
                    break
                await asyncio.sleep(0.01)
            assert gpt2_llm.engine.core.kv.num_free_blocks == gpt2_llm.engine.core.kv.num_blocks
            assert gpt2_llm.engine.num_generated_tokens - before <= len(expected.token_ids) + 2
            assert not engine.processor._requests
        finally:
            await engine.stop()

    asyncio.run(main())
