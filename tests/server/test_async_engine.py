"""`AsyncEngine` over a tiny random Llama (token-id prompts): streaming, validation errors reaching the
caller, aborts on cancellation, an idle thread that sleeps, and a dead engine reported as such."""

from __future__ import annotations

import asyncio
import time

import pytest

from gptserve import LLM, SamplingParams
from gptserve.errors import EngineDeadError, InvalidRequestError
from gptserve.frontend.async_engine import AsyncEngine

PROMPT = [5, 17, 42, 7, 99, 3]


@pytest.fixture(scope="module")
def llm(tiny_models) -> LLM:
    path, _ = tiny_models["llama"]
    return LLM(str(path), dtype="fp32", device="cpu", max_model_len=128, num_kv_blocks=64, block_size=8)


async def _until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.01)


def _run(llm: LLM, body) -> None:
    async def main() -> None:
        engine = AsyncEngine(llm.engine)
        engine.start()
        try:
            await body(engine)
        finally:
            await engine.stop()

    asyncio.run(main())


def test_generate_matches_offline(llm: LLM) -> None:
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    (offline,) = llm.generate([PROMPT], params)

    async def body(engine: AsyncEngine) -> None:
        outs = [o async for o in engine.generate(PROMPT, params, "a")]
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
        streamed = [t for o in outs for t in o.outputs[0].delta_token_ids]
        assert streamed == outs[-1].outputs[0].token_ids == offline.outputs[0].token_ids

    _run(llm, body)


def test_validation_error_reaches_caller(llm: LLM) -> None:
    async def body(engine: AsyncEngine) -> None:
        with pytest.raises(InvalidRequestError, match="vocabulary") as e:
            async for _ in engine.generate([1, 2, 10**6], SamplingParams(max_tokens=2), "bad"):
                pass
        assert e.value.param == "prompt"
        with pytest.raises(InvalidRequestError, match="tokenizer"):
            async for _ in engine.generate("text needs a tokenizer", SamplingParams(max_tokens=2), "text"):
                pass
        # The engine goes on serving.
        outs = [o async for o in engine.generate(PROMPT, SamplingParams(max_tokens=2, temperature=0), "ok")]
        assert outs[-1].finished

    _run(llm, body)


def test_cancel_aborts_and_frees_kv(llm: LLM) -> None:
    async def body(engine: AsyncEngine) -> None:
        params = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)

        async def consume() -> None:
            async for _ in engine.generate(PROMPT, params, "long"):
                await asyncio.sleep(0)

        task = asyncio.create_task(consume())
        await _until(lambda: engine.stats.num_running == 1)
        assert engine.stats.kv_cache_usage > 0
        task.cancel()  # what a client disconnect does to its handler
        await _until(lambda: engine.stats.num_running == 0 and engine.stats.kv_cache_usage == 0, timeout=5)
        assert llm.engine.core.kv.num_free_blocks == llm.engine.core.kv.num_blocks

    _run(llm, body)


def test_idle_thread_sleeps(llm: LLM) -> None:
    calls = 0
    step = llm.engine.core.step

    def counting_step():
        nonlocal calls
        calls += 1
        return step()

    async def body(engine: AsyncEngine) -> None:
        llm.engine.core.step = counting_step
        try:
            [o async for o in engine.generate(PROMPT, SamplingParams(max_tokens=3, temperature=0), "idle")]
            settled = calls
            await asyncio.sleep(0.3)
            assert calls == settled, "the engine thread steps while there is nothing to do"
        finally:
            del llm.engine.core.step

    _run(llm, body)


def test_engine_death_is_reported(llm: LLM) -> None:
    def broken_step():
        raise RuntimeError("simulated device failure")

    async def body(engine: AsyncEngine) -> None:
        died: list[BaseException] = []
        engine.on_dead.append(died.append)
        llm.engine.core.step = broken_step
        try:
            with pytest.raises(EngineDeadError, match="simulated"):
                async for _ in engine.generate(PROMPT, SamplingParams(max_tokens=4), "doomed"):
                    pass
            await _until(lambda: bool(died))
            assert engine.dead and isinstance(died[0], RuntimeError)
            with pytest.raises(EngineDeadError):
                engine.add_request(engine.inputs.process("after", PROMPT, SamplingParams(max_tokens=1)))
        finally:
            del llm.engine.core.step
            llm.engine.abort_request("doomed")

    _run(llm, body)
