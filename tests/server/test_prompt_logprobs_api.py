"""Prompt log-probabilities over the OpenAI API, as evaluation harnesses read them: `echo` with `logprobs`
on completions (the first token null), `max_tokens: 0` with `echo` (the prompt scored alone), and vLLM's
`prompt_logprobs` on both routes; every value equal to Hugging Face's log-softmax of the prompt (fp32),
also after an earlier request left the prompt's blocks in the prefix cache."""

from __future__ import annotations

import openai
import pytest
import torch

from tests.conftest import gpt2_tokenizer
from tests.server.conftest import start_tiny_gptj_server

MODEL = "tiny-scored"
TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
PROMPT = "The quick brown fox jumps over the lazy dog because it"


@pytest.fixture(scope="module")
def server(tiny_gptj_tokenized, tmp_path_factory):
    proc = start_tiny_gptj_server(
        tiny_gptj_tokenized, tmp_path_factory.mktemp("scored"), MODEL, 256, TEMPLATE
    )
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def reference(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)


@pytest.mark.parametrize("cached_first", [False, True])
def test_echo_with_logprobs_equals_transformers(client, tiny_gptj, cached_first):
    ids = gpt2_tokenizer().encode(PROMPT)
    ref = reference(tiny_gptj[1], ids)
    if cached_first:  # the prompt's blocks are in the prefix cache: the scored request recomputes them
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0)
    r = client.completions.create(
        model=MODEL, prompt=PROMPT, echo=True, logprobs=3, max_tokens=1, temperature=0
    )
    choice = r.choices[0]
    lp = choice.logprobs
    n = len(ids)
    assert choice.text.startswith(PROMPT) and len(lp.tokens) == n + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for j in range(1, n):
        assert abs(lp.token_logprobs[j] - ref[j - 1, ids[j]].item()) < 1e-4
        assert len(lp.top_logprobs[j]) <= 3
        assert max(lp.top_logprobs[j].values()) == pytest.approx(ref[j - 1].max().item(), abs=1e-4)
    assert lp.text_offset[:2] == [0, len(gpt2_tokenizer().decode(ids[:1]))]
    assert r.usage.prompt_tokens == n and r.usage.completion_tokens == 1
    assert not (r.usage.prompt_tokens_details and r.usage.prompt_tokens_details.cached_tokens)


def test_max_tokens_zero_with_echo_scores_the_prompt_alone(client, tiny_gptj):
    ids = gpt2_tokenizer().encode(PROMPT)
    ref = reference(tiny_gptj[1], ids)
    r = client.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=0, max_tokens=0)
    choice = r.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length" and r.usage.completion_tokens == 0
    got = choice.logprobs.token_logprobs
    assert got[0] is None and len(got) == len(ids)
    assert max(abs(g - ref[j, ids[j + 1]].item()) for j, g in enumerate(got[1:])) < 1e-4


def test_vllm_prompt_logprobs_on_both_routes(client, tiny_gptj):
    ids = gpt2_tokenizer().encode(PROMPT)
    ref = reference(tiny_gptj[1], ids)
    r = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=1, extra_body={"prompt_logprobs": 2}
    ).model_dump()
    entries = r["choices"][0]["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(ids)
    for j, entry in enumerate(entries[1:]):
        mine = entry[str(ids[j + 1])]
        assert abs(mine["logprob"] - ref[j, ids[j + 1]].item()) < 1e-4
        assert mine["rank"] == int((ref[j] > ref[j, ids[j + 1]]).sum()) + 1
        best = ref[j].argmax().item()
        assert entry[str(best)]["rank"] == 1
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=1,
        extra_body={"prompt_logprobs": 0},
    ).model_dump()  # fmt: skip
    assert chat["prompt_logprobs"][0] is None and all(e is not None for e in chat["prompt_logprobs"][1:])


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
        ({"prompt": PROMPT, "echo": True, "logprobs": 1, "stream": True}, "stream"),
        ({"prompt": PROMPT, "extra_body": {"prompt_logprobs": 21}}, "prompt_logprobs"),
    ],
)
def test_refusals_name_the_field(client, body, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, **body)
    assert info.value.status_code == 400 and info.value.body["param"] == param
