"""Acceptance tests of the Triton front-end: a real `gptserve serve --model-repository` process serving
FasterTransformer's GPT-J repository (preprocessing, fastertransformer, postprocessing, ensemble, plus a
decoupled copy of fastertransformer) over a tiny random GPT-J, driven by stock `tritonclient.http` and
`tritonclient.grpc`.

Covered: FT's `tools/end_to_end_test.py` flow (the four models in turn, then the ensemble) with greedy
output equal to Hugging Face greedy, bad and stop words, beam search and log-probs; gRPC decoupled
streaming and HTTP `generate_stream`; errors in Triton's form; the repository index, metadata and
config; Triton's and vLLM's metrics on the metrics port; cancellation of a stream mid-generation.
"""

from __future__ import annotations

import json
import queue
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from tests.conftest import gpt2_tokenizer, hf_greedy
from tests.server.conftest import ServerProcess, free_port, start_server
from tests.triton.ft_repository import fastertransformer_config, write_gptj_repository

# FT's tools/end_to_end_test.py: its prompts, word lists on rows 0 and 7, start/end ids.
PROMPTS = [
    "Blackhawks\n The 2015 Hilltoppers",
    "Data sources you can use to make a decision:",
    "\n if(angle = 0) { if(angle",
    "GMs typically get 78% female enrollment, but the ",
    "Previous Chapter | Index | Next Chapter",
    "Michael, an American Jew, called Jews",
    "Blackhawks\n The 2015 Hilltoppers",
    "Data sources you can use to make a comparison:",
]
BAD_ROW, STOP_ROW = 0, 7
OUTPUT_LEN = 10  # FT sends 24; fewer keeps the test fast
START_ID, END_ID = 220, 50256
GPT2_TOKENS = 50257  # ids at or above have no text (the model's vocabulary is padded to 50400)
MAX_LEN = 2048
LONG = MAX_LEN - 64  # far more tokens than a cancellation test waits for
DECOUPLED = "fastertransformer_decoupled"
MODELS = {"ensemble", "fastertransformer", DECOUPLED, "postprocessing", "preprocessing"}
PROTOCOLS = ["http", "grpc"]


@dataclass
class Served:
    process: ServerProcess
    grpc_url: str
    metrics_url: str
    repository: Path
    hf: torch.nn.Module

    @property
    def http_url(self) -> str:
        return self.process.url.removeprefix("http://")

    def client(self, protocol: str):
        if protocol == "http":
            return httpclient.InferenceServerClient(self.http_url, network_timeout=300)
        return grpcclient.InferenceServerClient(self.grpc_url)


@pytest.fixture(scope="module")
def served(tiny_gptj, tmp_path_factory) -> Iterator[Served]:
    checkpoint, hf = tiny_gptj
    repository = write_gptj_repository(tmp_path_factory.mktemp("gptj-repository"), checkpoint)
    decoupled = fastertransformer_config(str(checkpoint), decoupled=True)
    (repository / DECOUPLED / "1").mkdir(parents=True)
    (repository / DECOUPLED / "config.pbtxt").write_text(
        decoupled.replace('name: "fastertransformer"', f'name: "{DECOUPLED}"', 1)
    )
    grpc_port, metrics_port = free_port(), free_port()
    process = start_server(
        "--model-repository", str(repository), "--max-model-len", str(MAX_LEN), "--kv-cache-memory", "64MiB",
        "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
    )  # fmt: skip
    try:
        yield Served(
            process, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{metrics_port}/metrics", repository, hf
        )
    finally:
        assert process.stop() == 0


# ------------------------------------------------------------------------------------ the reference
@dataclass
class Reference:
    """Hugging Face's greedy continuation of every prompt, and word lists chosen from it so that they
    change the output: a bad word row BAD_ROW would produce, a stop word row STOP_ROW produces."""

    prompt_ids: list[list[int]]
    greedy: list[list[int]]  # OUTPUT_LEN tokens per row, cut after end_id as FT stops there
    logprobs: list[torch.Tensor]  # [steps, vocab] log-softmax of each greedy step
    bad_csv: str
    bad_ids: list[int]
    bad_at: int  # where the unconstrained greedy output of BAD_ROW has the first bad word
    stop_csv: str
    stop_at: int  # where STOP_ROW's output has its stop word
    tokenizer: Any = field(repr=False)

    def decode(self, ids: list[int]) -> str:
        """What FT's postprocessing returns for one row of output ids: the GPT-2 decode of every id, the
        end-id padding included."""
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def _word(tokenizer, token: int) -> str | None:
    """The text of `token` when it is a usable one-token word of an FT word-list CSV."""
    if token >= GPT2_TOKENS or token == END_ID:
        return None
    text = tokenizer.decode([token])
    if not text.strip() or any(c in text for c in ',"\r\n\ufffd'):
        return None
    return text if tokenizer.encode(text) == [token] else None


@pytest.fixture(scope="module")
def reference(served: Served) -> Reference:
    tokenizer = gpt2_tokenizer()
    prompt_ids = [tokenizer.encode(p) for p in PROMPTS]
    greedy, logprobs = [], []
    for ids in prompt_ids:
        tokens, lp = hf_greedy(served.hf, ids, OUTPUT_LEN)
        if END_ID in tokens:
            tokens = tokens[: tokens.index(END_ID) + 1]
        greedy.append(tokens)
        logprobs.append(lp)

    words = [(i, t, w) for i, t in enumerate(greedy[BAD_ROW]) if (w := _word(tokenizer, t))]
    assert words, "no greedy token of the bad-word row is a usable word; change the seed"
    bad_at, first_bad, bad_word = words[0]
    others = [w for _, t, w in words if t != first_bad]
    bad_csv = f"{bad_word},{others[0]}" if others else f"{bad_word},{bad_word}"
    bad_ids = sorted({first_bad, *(tokenizer.encode(others[0]) if others else [])})

    stop = greedy[STOP_ROW]
    candidates = [
        (i, w)
        for i, t in enumerate(stop[: OUTPUT_LEN - 2])
        if i >= 2 and t not in stop[:i] and (w := _word(tokenizer, t))
    ]
    assert candidates, "no greedy token of the stop-word row is a usable word; change the seed"
    stop_at, stop_word = candidates[0]
    return Reference(
        prompt_ids, greedy, logprobs, bad_csv, bad_ids, bad_at, f"{stop_word},{stop_word}", stop_at, tokenizer
    )


def forced_logprobs(model: torch.nn.Module, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """Log-softmax of the model's logits at each generated position, given the tokens before it."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + generated])).logits[0].float()
    start = len(prompt) - 1
    return torch.log_softmax(logits[start : start + len(generated)], dim=-1)


# ------------------------------------------------------------------------------------------ helpers
def prepare_tensor(protocol: str, name: str, data: np.ndarray):
    """FT's `prepare_tensor`: an input of the array's own datatype and shape."""
    module = httpclient if protocol == "http" else grpcclient
    tensor = module.InferInput(name, list(data.shape), np_to_triton_dtype(data.dtype))
    tensor.set_data_from_numpy(data)
    return tensor


def ft_scalars(
    protocol: str, batch: int, seed_dtype: type = np.uint64, beam_width: int = 1, top_k: int = 1
) -> list:
    """FT's per-request scalars, each [batch, 1] in FT's datatype, start_id 220 and end_id 50256."""
    ones = np.ones([batch, 1])
    values = {
        "runtime_top_k": (top_k * ones).astype(np.uint32),
        "runtime_top_p": 0.0 * ones.astype(np.float32),
        "beam_search_diversity_rate": 0.0 * ones.astype(np.float32),
        "temperature": 1.0 * ones.astype(np.float32),
        "len_penalty": 1.0 * ones.astype(np.float32),
        "repetition_penalty": 1.0 * ones.astype(np.float32),
        "random_seed": 0 * ones.astype(seed_dtype),
        "is_return_log_probs": True * ones.astype(bool),
        "beam_width": (beam_width * ones).astype(np.uint32),
        "start_id": START_ID * ones.astype(np.uint32),
        "end_id": END_ID * ones.astype(np.uint32),
    }
    return [prepare_tensor(protocol, name, data) for name, data in values.items()]


def padded(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """input_ids padded with end_id [B, L] and input_lengths [B, 1], as FT's preprocessing makes them."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), END_ID, dtype=np.uint32)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = row
    return ids, np.array([[len(r)] for r in rows], dtype=np.uint32)


def token_inputs(protocol: str, rows: list[list[int]], output_len: int, **scalars) -> list:
    ids, lengths = padded(rows)
    return [
        prepare_tensor(protocol, "input_ids", ids),
        prepare_tensor(protocol, "input_lengths", lengths),
        prepare_tensor(protocol, "request_output_len", np.full((len(rows), 1), output_len, np.uint32)),
        *ft_scalars(protocol, len(rows), **scalars),
    ]


def triton_error(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


def status_of(error: InferenceServerException) -> str:
    """The error's status as the two clients spell it: "400" or "StatusCode.INVALID_ARGUMENT"."""
    return str(error.status())


STATUS = {
    "http": {"invalid": "400", "not_found": "404", "unavailable": "503"},
    "grpc": {
        "invalid": "StatusCode.INVALID_ARGUMENT",
        "not_found": "StatusCode.NOT_FOUND",
        "unavailable": "StatusCode.UNAVAILABLE",
        "unimplemented": "StatusCode.UNIMPLEMENTED",
    },
}


def scrape(url: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (labels as printed)."""
    out = {}
    for line in httpx.get(url, timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 if none)."""
    total = 0.0
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        if all(found.get(k) == v for k, v in labels.items()):
            total += value
    return total


def wait_for(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def engine_busy(url: str) -> bool:
    samples = scrape(url)
    return (
        metric(samples, "vllm:num_requests_running") > 0 and metric(samples, "vllm:kv_cache_usage_perc") > 0
    )


def engine_idle(url: str) -> bool:
    samples = scrape(url)
    return (
        metric(samples, "vllm:num_requests_running") == 0 and metric(samples, "vllm:kv_cache_usage_perc") == 0
    )


# --------------------------------------------------------------------------- 1. end_to_end_test.py
def check_ft_outputs(ref: Reference, hf: torch.nn.Module, output_ids, sequence_length, cum, per_token):
    """FT's outputs of the 8 prompts against Hugging Face: greedy rows equal its greedy continuation,
    the bad-word row avoids the bad words (greedy among the rest), the stop-word row stops after it."""
    batch = len(PROMPTS)
    width = max(len(p) for p in ref.prompt_ids) + OUTPUT_LEN
    assert output_ids.dtype == np.uint32 and output_ids.shape == (batch, 1, width)
    assert sequence_length.dtype == np.uint32 and sequence_length.shape == (batch, 1)
    assert cum.shape == (batch, 1) and per_token.shape == (batch, 1, OUTPUT_LEN)
    generated = []
    for b, prompt in enumerate(ref.prompt_ids):
        row, length = output_ids[b, 0].tolist(), int(sequence_length[b, 0])
        assert row[: len(prompt)] == prompt, f"row {b}: output_ids must start with the prompt"
        assert all(t == END_ID for t in row[length:]), f"row {b}: padding must be end_id"
        gen = row[len(prompt) : length]
        generated.append(gen)
        if b == BAD_ROW:
            assert not set(gen) & set(ref.bad_ids), f"bad words {ref.bad_ids} were produced: {gen}"
            assert gen[: ref.bad_at] == ref.greedy[b][: ref.bad_at] and gen != ref.greedy[b]
            banned = forced_logprobs(hf, prompt, gen)
            banned[:, ref.bad_ids] = -float("inf")
            assert gen == banned.argmax(-1).tolist(), "greedy among the tokens that are not bad words"
        elif b == STOP_ROW:
            assert gen == ref.greedy[b][: ref.stop_at + 1], "generation ends right after the stop word"
        else:
            assert gen == ref.greedy[b], f"row {b}: greedy output differs from Hugging Face greedy"
        lp = per_token[b, 0]
        assert np.all(lp[len(gen) :] == 0)
        assert cum[b, 0] == pytest.approx(float(lp[: len(gen)].sum()), abs=1e-4)
        if b != BAD_ROW:
            expected = ref.logprobs[b][torch.arange(len(gen)), torch.tensor(gen)].numpy()
            np.testing.assert_allclose(lp[: len(gen)], expected, atol=2e-3)
    assert generated[BAD_ROW] != generated[6], "rows 0 and 6 share a prompt; only row 0 has bad words"
    return generated


@pytest.mark.parametrize(
    "protocol, ft_seed, ensemble_seed",
    [("http", np.uint64, np.int32), ("grpc", np.int32, np.uint64)],
    ids=["http", "grpc"],
)
def test_end_to_end_flow(served: Served, reference: Reference, protocol, ft_seed, ensemble_seed):
    """FT's end_to_end_test.py, step by step and then as the ensemble, random_seed UINT64 (FT main) or
    INT32 (FT v1.1 / the blog branch)."""
    batch = len(PROMPTS)
    query = np.array([[p] for p in PROMPTS]).astype(object)
    output_len = np.ones_like(query).astype(np.uint32) * OUTPUT_LEN
    bad = np.array([[reference.bad_csv if b == BAD_ROW else ""] for b in range(batch)], dtype=object)
    stop = np.array([[reference.stop_csv if b == STOP_ROW else ""] for b in range(batch)], dtype=object)
    with served.client(protocol) as client:
        # 1. preprocessing
        result = client.infer(
            "preprocessing",
            [
                prepare_tensor(protocol, "QUERY", query),
                prepare_tensor(protocol, "BAD_WORDS_DICT", bad),
                prepare_tensor(protocol, "STOP_WORDS_DICT", stop),
                prepare_tensor(protocol, "REQUEST_OUTPUT_LEN", output_len),
            ],
        )
        input_id, input_len = result.as_numpy("INPUT_ID"), result.as_numpy("REQUEST_INPUT_LEN")
        bad_ids, stop_ids = result.as_numpy("BAD_WORDS_IDS"), result.as_numpy("STOP_WORDS_IDS")
        expected_ids, expected_lens = padded(reference.prompt_ids)
        assert input_id.dtype == np.uint32 and np.array_equal(input_id, expected_ids)
        assert input_len.dtype == np.uint32 and np.array_equal(input_len, expected_lens)
        assert np.array_equal(result.as_numpy("REQUEST_OUTPUT_LEN"), output_len)
        assert bad_ids.dtype == np.int32 and bad_ids.shape[:2] == (batch, 2)
        assert set(bad_ids[BAD_ROW, 0][: bad_ids[BAD_ROW, 1].max()].tolist()) == set(reference.bad_ids)
        assert bad_ids[BAD_ROW, 1, 0] == 1 and np.all(bad_ids[1:, 1] == -1)
        assert stop_ids.dtype == np.int32 and np.all(stop_ids[:STOP_ROW, 1] == -1)
        assert stop_ids[STOP_ROW, 1, :2].tolist() == [1, 2]
        assert stop_ids[STOP_ROW, 0, 0] == reference.greedy[STOP_ROW][reference.stop_at]

        # 2. fastertransformer
        result = client.infer(
            "fastertransformer",
            [
                prepare_tensor(protocol, "input_ids", input_id),
                prepare_tensor(protocol, "input_lengths", input_len),
                prepare_tensor(protocol, "request_output_len", output_len),
                *ft_scalars(protocol, batch, seed_dtype=ft_seed),
                prepare_tensor(protocol, "bad_words_list", bad_ids),
                prepare_tensor(protocol, "stop_words_list", stop_ids),
            ],
        )
        output_ids, sequence_length = result.as_numpy("output_ids"), result.as_numpy("sequence_length")
        cum, per_token = result.as_numpy("cum_log_probs"), result.as_numpy("output_log_probs")
        generated = check_ft_outputs(reference, served.hf, output_ids, sequence_length, cum, per_token)

        # 3. postprocessing
        result = client.infer("postprocessing", [prepare_tensor(protocol, "TOKENS_BATCH", output_ids)])
        texts = result.as_numpy("OUTPUT")
        assert texts.shape == (batch,)  # FT's model.py returns one flat string per beam
        decoded = [reference.decode(row[0].tolist()) for row in output_ids]
        assert [t.decode() for t in texts] == decoded
        for text, p, g in zip(decoded, reference.prompt_ids, generated):
            assert text.startswith(reference.tokenizer.decode(p + g, skip_special_tokens=True))

        # 4. ensemble, in one call
        result = client.infer(
            "ensemble",
            [
                prepare_tensor(protocol, "INPUT_0", query),
                prepare_tensor(protocol, "INPUT_1", output_len),
                prepare_tensor(protocol, "INPUT_2", bad),
                prepare_tensor(protocol, "INPUT_3", stop),
                *ft_scalars(protocol, batch, seed_dtype=ensemble_seed),
            ],
        )
        assert [t.decode() for t in result.as_numpy("OUTPUT_0")] == decoded
        assert np.array_equal(result.as_numpy("sequence_length"), sequence_length)
        np.testing.assert_allclose(result.as_numpy("cum_log_probs"), cum, atol=1e-5)
        np.testing.assert_allclose(result.as_numpy("output_log_probs"), per_token, atol=1e-5)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_beam_width_2_returns_two_beams(served: Served, reference: Reference, protocol: str):
    rows = reference.prompt_ids[1:3]
    output_len = 6
    with served.client(protocol) as client:
        result = client.infer(
            "fastertransformer", token_inputs(protocol, rows, output_len, beam_width=2, top_k=0)
        )
    output_ids, lengths = result.as_numpy("output_ids"), result.as_numpy("sequence_length")
    cum = result.as_numpy("cum_log_probs")
    width = max(len(r) for r in rows) + output_len
    assert output_ids.shape == (2, 2, width) and lengths.shape == (2, 2) and cum.shape == (2, 2)
    for b, prompt in enumerate(rows):
        beams = []
        for k in range(2):
            row = output_ids[b, k].tolist()
            assert row[: len(prompt)] == prompt
            gen = row[len(prompt) : int(lengths[b, k])]
            assert 0 < len(gen) <= output_len
            beams.append(gen)
            scored = forced_logprobs(served.hf, prompt, gen)[torch.arange(len(gen)), torch.tensor(gen)]
            assert cum[b, k] == pytest.approx(float(scored.sum()), abs=2e-3)
        assert beams[0] != beams[1], "two beams of one row must be different sequences"
        assert cum[b, 0] >= cum[b, 1] - 1e-4 or len(beams[0]) != len(beams[1])


# ------------------------------------------------------------------------------------- 2. streaming
class StreamCollector:
    """`start_stream` callback: every (result, error) in arrival order."""

    def __init__(self) -> None:
        self.items: queue.Queue = queue.Queue()

    def __call__(self, result, error) -> None:
        self.items.put((result, error))

    def get(self, timeout: float = 60.0):
        return self.items.get(timeout=timeout)


def test_grpc_decoupled_stream_one_response_per_token(served: Served, reference: Reference):
    row = 1
    prompt, greedy = reference.prompt_ids[row], reference.greedy[row]
    client = served.client("grpc")
    collector = StreamCollector()
    client.start_stream(collector)
    try:
        client.async_stream_infer(DECOUPLED, token_inputs("grpc", [prompt], OUTPUT_LEN), request_id="s1")
        responses = []
        while True:
            result, error = collector.get()
            assert error is None, error
            responses.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
    finally:
        client.stop_stream()
        client.close()
    assert len(responses) == len(greedy), "one response per generated token"
    for step, result in enumerate(responses, start=1):
        response = result.get_response()
        assert response.id == "s1" and response.model_name == DECOUPLED
        final = response.parameters["triton_final_response"].bool_param
        assert final == (step == len(greedy))
        length = int(result.as_numpy("sequence_length")[0, 0])
        assert length == len(prompt) + step
        assert result.as_numpy("output_ids")[0, 0, :length].tolist() == prompt + greedy[:step]


def test_http_generate_stream_on_the_ensemble(served: Served, reference: Reference):
    row = 2
    body = {
        "INPUT_0": PROMPTS[row], "INPUT_1": OUTPUT_LEN, "INPUT_2": "", "INPUT_3": "",
        "runtime_top_k": 1, "start_id": START_ID, "end_id": END_ID,
    }  # fmt: skip
    url = f"{served.process.url}/v2/models/ensemble"
    whole = httpx.post(f"{url}/generate", json=body, timeout=300)
    assert whole.status_code == 200, whole.text
    text = whole.json()["OUTPUT_0"]
    assert text == reference.decode(reference.prompt_ids[row] + reference.greedy[row])

    stream = httpx.post(f"{url}/generate_stream", json={**body, "stream": True}, timeout=300)
    assert stream.status_code == 200
    assert stream.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(b.removeprefix("data: ")) for b in stream.text.split("\n\n") if b.strip()]
    # The ensemble's config is not decoupled: Triton answers it once, streamed or not.
    assert len(events) == 1 and events[0]["OUTPUT_0"] == text


def test_http_generate_stream_on_a_decoupled_model(served: Served, reference: Reference):
    row = 2
    prompt = reference.prompt_ids[row]
    body = {"input_ids": [prompt], "input_lengths": [len(prompt)], "request_output_len": [OUTPUT_LEN],
            "runtime_top_k": 1, "start_id": START_ID, "end_id": END_ID}  # fmt: skip
    stream = httpx.post(f"{served.process.url}/v2/models/{DECOUPLED}/generate_stream", json=body, timeout=300)
    assert stream.status_code == 200, stream.text
    events = [json.loads(b.removeprefix("data: ")) for b in stream.text.split("\n\n") if b.strip()]
    assert not any("error" in e for e in events), events
    assert [e["sequence_length"] for e in events] == [
        len(prompt) + i for i in range(1, len(reference.greedy[row]) + 1)
    ], "one event per generated token"


# ---------------------------------------------------------------------------------------- 3. errors
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_errors_in_tritons_form(served: Served, reference: Reference, protocol: str):
    prompt = reference.prompt_ids[1]
    codes = STATUS[protocol]
    with served.client(protocol) as client:

        def error(model: str, inputs: list, version: str = "") -> InferenceServerException:
            return triton_error(lambda: client.infer(model, inputs, model_version=version))

        err = error("gptj-nope", token_inputs(protocol, [prompt], 2))
        assert status_of(err) == codes["not_found"] and "gptj-nope" in err.message()
        err = error("fastertransformer", token_inputs(protocol, [prompt], 2), version="7")
        assert status_of(err) == codes["not_found"] and "7" in err.message()

        for bad_type in (
            prepare_tensor(protocol, "input_ids", np.array([[b"12"]], dtype=object)),
            prepare_tensor(protocol, "input_ids", np.array([prompt], dtype=np.float32)),
        ):
            inputs = [bad_type, *token_inputs(protocol, [prompt], 2)[1:]]
            err = error("fastertransformer", inputs)
            assert status_of(err) == codes["invalid"] and "input_ids" in err.message()

        float_length = [
            prepare_tensor(protocol, "request_output_len", np.array([[2.0]], np.float32))
            if t.name() == "request_output_len"
            else t
            for t in token_inputs(protocol, [prompt], 2)
        ]  # declared UINT32: Triton names the datatype it expects
        err = error("fastertransformer", float_length)
        assert status_of(err) == codes["invalid"]
        assert "request_output_len" in err.message() and "UINT32" in err.message() and "FP32" in err.message()

        wrong_shape = token_inputs(protocol, [prompt], 2)
        wrong_shape[1] = prepare_tensor(protocol, "input_lengths", np.array([[[len(prompt)]]], np.uint32))
        err = error("fastertransformer", wrong_shape)
        assert status_of(err) == codes["invalid"] and "input_lengths" in err.message()

        missing = [t for t in token_inputs(protocol, [prompt], 2) if t.name() != "input_lengths"]
        err = error("fastertransformer", missing)
        assert status_of(err) == codes["invalid"] and "input_lengths" in err.message()

        err = error(DECOUPLED, token_inputs(protocol, [prompt], 2))
        decoupled_code = codes["invalid"] if protocol == "http" else codes["unimplemented"]
        assert status_of(err) == decoupled_code and "decoupled" in err.message()

        assert client.is_server_ready() and client.is_model_ready("fastertransformer")
        good = client.infer("fastertransformer", token_inputs(protocol, [prompt], 3))
        assert good.as_numpy("output_ids")[0, 0, len(prompt) :].tolist() == reference.greedy[1][:3]


def test_http_error_bodies_are_tritons(served: Served):
    base = f"{served.process.url}/v2/models"
    for path, status in (
        ("gptj-nope/infer", 404),
        ("fastertransformer/versions/7/infer", 404),
        (f"{DECOUPLED}/infer", 400),
    ):
        body = {"inputs": [{"name": "input_ids", "shape": [1, 1], "datatype": "UINT32", "data": [1]}]}
        response = httpx.post(f"{base}/{path}", json=body, timeout=60)
        assert response.status_code == status and set(response.json()) == {"error"}, response.text


# ------------------------------------------------------------------------------------ 4. repository
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_repository_metadata_and_config(served: Served, protocol: str):
    with served.client(protocol) as client:
        if protocol == "http":
            index = client.get_model_repository_index()
        else:
            index = client.get_model_repository_index(as_json=True)["models"]
        assert {(e["name"], e["version"], e["state"]) for e in index} == {(m, "1", "READY") for m in MODELS}

        for name in sorted(MODELS):
            pbtxt = text_format.Parse(
                (served.repository / name / "config.pbtxt").read_text(), mc.ModelConfig()
            )
            if protocol == "http":
                meta = client.get_model_metadata(name)
                config_json = client.get_model_config(name)
            else:
                meta = json_format.MessageToDict(client.get_model_metadata(name))
                config_json = client.get_model_config(name, as_json=True)["config"]
            assert meta["name"] == name and meta["versions"] == ["1"]
            shapes = {t["name"]: [int(d) for d in t["shape"]] for t in meta["inputs"] + meta["outputs"]}
            declared = {t.name: [-1, *t.dims] for t in [*pbtxt.input, *pbtxt.output]}
            assert shapes == declared, "metadata shapes are the batch dimension (-1) then the config dims"
            datatypes = {t["name"]: t["datatype"] for t in meta["inputs"] + meta["outputs"]}
            assert datatypes == {
                t.name: mc.DataType.Name(t.data_type).removeprefix("TYPE_").replace("STRING", "BYTES")
                for t in [*pbtxt.input, *pbtxt.output]
            }
            config = json_format.ParseDict(config_json, mc.ModelConfig(), ignore_unknown_fields=True)
            assert config.name == name and config.max_batch_size == pbtxt.max_batch_size
            assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
                (t.name, t.data_type, list(t.dims)) for t in pbtxt.input
            ]
            assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [
                (t.name, t.data_type, list(t.dims)) for t in pbtxt.output
            ]
            assert config.parameters == pbtxt.parameters
            assert config.ensemble_scheduling == pbtxt.ensemble_scheduling
            assert config.model_transaction_policy.decoupled == (name == DECOUPLED)
        ft = client.get_model_metadata("fastertransformer")
        ft = ft if protocol == "http" else json_format.MessageToDict(ft)
        inputs = {t["name"]: t for t in ft["inputs"]}
        assert inputs["input_ids"]["datatype"] == "UINT32"
        assert [int(d) for d in inputs["bad_words_list"]["shape"]] == [-1, 2, -1]

        codes = STATUS[protocol]
        for call in (lambda: client.load_model("fastertransformer"), lambda: client.unload_model("ensemble")):
            err = triton_error(call)
            assert status_of(err) == codes["unavailable"]
            assert "explicit" in err.message()
        assert client.is_model_ready("ensemble") and client.is_model_ready("fastertransformer")


# --------------------------------------------------------------------------------------- 5. metrics
def test_triton_metrics_move_by_the_right_amounts(served: Served, reference: Reference):
    rows = reference.prompt_ids[1:4]
    labels = {"model": "fastertransformer", "version": "1"}
    before = scrape(served.metrics_url)
    with served.client("http") as http, served.client("grpc") as grpc:
        http.infer("fastertransformer", token_inputs("http", rows, 2))
        grpc.infer("fastertransformer", token_inputs("grpc", rows[:1], 2))
        refused = token_inputs("grpc", rows[:1], 2)
        refused[2] = prepare_tensor("grpc", "request_output_len", np.zeros((1, 1), np.uint32))
        err = triton_error(lambda: grpc.infer("fastertransformer", refused))
        assert "request_output_len" in err.message()
    after = scrape(served.metrics_url)

    def moved(name: str, **extra: str) -> float:
        return metric(after, name, **labels, **extra) - metric(before, name, **labels, **extra)

    assert moved("nv_inference_request_success") == 2
    assert moved("nv_inference_count") == len(rows) + 1  # one inference per batch row
    assert moved("nv_inference_exec_count") == 2
    assert moved("nv_inference_request_failure") == 1
    assert moved("nv_inference_request_duration_us") > 0
    other = {"model": "preprocessing", "version": "1"}
    assert metric(after, "nv_inference_request_success", **other) == metric(
        before, "nv_inference_request_success", **other
    )
    for name in ("vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:request_success_total"):
        assert any(key.startswith(name + "{") for key in after), f"{name} is missing"
    generated = metric(after, "vllm:generation_tokens_total") - metric(before, "vllm:generation_tokens_total")
    assert generated == 2 * (len(rows) + 1)


# ---------------------------------------------------------------------------------- 6. cancellation
def aborted(url: str) -> float:
    return metric(scrape(url), "vllm:request_success_total", finished_reason="abort")


def test_cancelled_grpc_stream_frees_the_engine(served: Served, reference: Reference):
    wait_for(lambda: engine_idle(served.metrics_url), "an idle engine")
    before = aborted(served.metrics_url)
    failures = metric(scrape(served.metrics_url), "nv_inference_request_failure", model=DECOUPLED)
    client = served.client("grpc")
    collector = StreamCollector()
    client.start_stream(collector)
    client.async_stream_infer(
        "fastertransformer", token_inputs("grpc", reference.prompt_ids[:1], LONG), request_id="long-ft"
    )
    client.async_stream_infer(
        DECOUPLED, token_inputs("grpc", reference.prompt_ids[1:2], LONG), request_id="long-decoupled"
    )
    result, error = collector.get()  # the decoupled model's first token: both are generating
    assert error is None and result.get_response().id == "long-decoupled"
    wait_for(lambda: engine_busy(served.metrics_url), "the request to be running")
    client.stop_stream(cancel_requests=True)
    client.close()
    wait_for(lambda: engine_idle(served.metrics_url), "the cancelled request to free the engine")
    wait_for(lambda: aborted(served.metrics_url) == before + 1, "the engine request to be aborted")
    wait_for(
        lambda: (
            metric(scrape(served.metrics_url), "nv_inference_request_failure", model=DECOUPLED)
            == failures + 1
        ),
        "the decoupled model to count the cancelled request",
    )
    with served.client("grpc") as again:
        assert again.is_server_ready()


def test_closed_http_generate_stream_frees_the_engine(served: Served):
    """A client that hangs up while the ensemble (not decoupled: one answer, at the end) generates."""
    wait_for(lambda: engine_idle(served.metrics_url), "an idle engine")
    before = aborted(served.metrics_url)
    body = json.dumps({"INPUT_0": PROMPTS[3], "INPUT_1": LONG, "INPUT_2": "", "INPUT_3": "",
                       "runtime_top_k": 1, "end_id": END_ID}).encode()  # fmt: skip
    host, port = served.process.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as connection:
        connection.sendall(
            b"POST /v2/models/ensemble/generate_stream HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        wait_for(lambda: engine_busy(served.metrics_url), "the request to be running")
    wait_for(lambda: engine_idle(served.metrics_url), "the closed stream to free the engine")
    wait_for(lambda: aborted(served.metrics_url) == before + 1, "the engine request to be aborted")
    assert httpx.get(f"{served.process.url}/v2/health/ready", timeout=30).status_code == 200
