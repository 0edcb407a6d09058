"""32 concurrent streaming requests, each equal to its greedy non-streamed result."""

from __future__ import annotations

import asyncio

import openai

NUM_REQUESTS = 32
MAX_TOKENS = 6


def _prompts() -> list[str]:
    subjects = ["cats", "rivers", "Paris", "music", "winter", "robots", "tea", "the moon"]
    forms = ["A short fact about {}:", "Tell me about {}.", "My favourite thing about {} is", "Why {}?"]
    return [form.format(s) for form in forms for s in subjects][:NUM_REQUESTS]


async def _stream_all(url: str, model: str, prompts: list[str]) -> list[tuple[str, str]]:
    async with openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600) as client:

        async def one(prompt: str) -> tuple[str, str]:
            stream = await client.completions.create(
                model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True
            )
            text, finish = "", ""
            async for chunk in stream:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            return text, finish

        return await asyncio.gather(*(one(p) for p in prompts))


def test_32_concurrent_streams(server, client: openai.OpenAI, model_name: str) -> None:
    prompts = _prompts()
    assert len(set(prompts)) == NUM_REQUESTS
    # The references come from one batched non-streamed request; outputs must not depend on the batch.
    reference = client.completions.create(
        model=model_name, prompt=prompts, max_tokens=MAX_TOKENS, temperature=0
    )
    expected = [(c.text, c.finish_reason) for c in sorted(reference.choices, key=lambda c: c.index)]
    streamed = asyncio.run(_stream_all(f"{server.url}/v1", model_name, prompts))
    assert streamed == expected
