"""Stock `tritonclient.grpc` against the gRPC service over a real registry and a real tiny GPT-J engine.

The service runs on its own event loop in a background thread, as it does inside the app: the registry,
its `LLMModel`s and the `AsyncEngine` share that loop. Covered: health, metadata, config, index,
statistics, `ModelInfer` in FasterTransformer's token form (greedy equals Hugging Face greedy, log-probs
included), `ModelStreamInfer` (per-step responses, `triton_final_response`, the opt-in empty final
response, concurrent requests on one stream, errors that leave the stream open), cancellation of a
stream and of a unary call (KV freed, engine request aborted), error statuses, and the API key.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from gptserve.engine.builder import build_engine
from gptserve.engine.engine_options import EngineOptions
from gptserve.engine.llm_engine import LLMEngine
from gptserve.frontend.async_engine import AsyncEngine
from gptserve.frontend.metrics import ServerMetrics
from gptserve.triton.grpc_server import start_grpc_server
from gptserve.triton.registry import ModelRegistry
from tests.conftest import build_tiny_model, hf_greedy
from tests.helpers import free_port

API_KEY = "s3cret"
AUTH = {"authorization": f"Bearer {API_KEY}"}
PROMPTS = [[5, 17, 42, 7, 99, 3], [11, 2, 300]]
LONG = 900  # tokens: far more than a test waits for, so only an abort ends the request early


class LoopThread:
    """An event loop running forever on its own thread; `run` executes a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="grpc-test-loop", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@dataclass
class Served:
    url: str
    keyed_url: str
    engine: LLMEngine
    metrics: ServerMetrics
    hf: torch.nn.Module

    def client(self, keyed: bool = False) -> grpcclient.InferenceServerClient:
        return grpcclient.InferenceServerClient(self.keyed_url if keyed else self.url)

    def aborted(self) -> float:
        text = self.metrics.render().decode()
        found = re.findall(
            r'vllm:request_success_total\{[^}]*finished_reason="abort"[^}]*\} ([0-9.e+]+)', text
        )
        return sum(float(v) for v in found)

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Until the engine holds no request and no KV block."""
        deadline = time.monotonic() + timeout
        while self.engine.has_unfinished_requests() or self.engine.core.kv.usage > 0:
            assert time.monotonic() < deadline, f"engine still busy, kv usage {self.engine.core.kv.usage}"
            time.sleep(0.02)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    path = tmp_path_factory.mktemp("tiny-gptj-grpc")
    hf = build_tiny_model("gptj", path, n_positions=1024)
    options = EngineOptions(device="cpu", dtype="fp32", max_model_len=1024, num_kv_blocks=512, block_size=8)
    llm = build_engine(str(path), options)
    loop = LoopThread()
    port, keyed_port = free_port(), free_port()

    async def up():
        async_engine = AsyncEngine(llm)
        async_engine.metrics = ServerMetrics("tiny", lambda: async_engine.stats)
        async_engine.start()
        registry = ModelRegistry([], EngineOptions())
        registry.add_llm("tiny", async_engine)
        decoupled = registry.add_llm("tiny-decoupled", async_engine)
        decoupled.streams_on_request = False  # FT's decoupled mode: every request streams
        await registry.start()
        servers = [
            await start_grpc_server(registry, "127.0.0.1", port, None),
            await start_grpc_server(registry, "127.0.0.1", keyed_port, API_KEY),
        ]
        return async_engine, registry, servers

    async_engine, registry, servers = loop.run(up())

    async def down():
        for server in servers:
            await server.stop(0)
        await registry.stop()
        await async_engine.stop()

    try:
        yield Served(f"127.0.0.1:{port}", f"127.0.0.1:{keyed_port}", llm, async_engine.metrics, hf)
    finally:
        loop.run(down())
        loop.close()


def ft_inputs(
    prompts: list[list[int]], output_len: int, stream: bool | None = None, log_probs: bool = False
) -> list[grpcclient.InferInput]:
    """FasterTransformer's token-form inputs, as `tools/end_to_end_test.py` builds them."""
    batch, width = len(prompts), max(len(p) for p in prompts)
    ids = np.zeros((batch, width), np.uint32)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    tensors = {
        "input_ids": ids,
        "input_lengths": np.array([[len(p)] for p in prompts], np.uint32),
        "request_output_len": np.full((batch, 1), output_len, np.uint32),
    }
    if stream is not None:
        tensors["stream"] = np.full((batch, 1), stream, bool)
    if log_probs:
        tensors["is_return_log_probs"] = np.ones((batch, 1), bool)
    return [tensor(name, data) for name, data in tensors.items()]


def tensor(name: str, data: np.ndarray, datatype: str | None = None) -> grpcclient.InferInput:
    datatype = (
        datatype or {np.dtype(bool): "BOOL", np.dtype(object): "BYTES"}.get(data.dtype) or data.dtype.name
    )
    t = grpcclient.InferInput(name, list(data.shape), datatype.upper().replace("FLOAT", "FP"))
    return t.set_data_from_numpy(data)


def status_of(call: Callable[[], object]) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value.status(), info.value.message()


class StreamCollector:
    """`start_stream` callback target: responses and errors as (id, final, result, error)."""

    def __init__(self) -> None:
        self.items: queue.Queue = queue.Queue()

    def __call__(self, result, error) -> None:
        if error is not None:
            self.items.put((None, None, None, error))
            return
        response = result.get_response()
        final = response.parameters["triton_final_response"].bool_param
        self.items.put((response.id, final, result, None))

    def get(self, timeout: float = 60.0):
        return self.items.get(timeout=timeout)

    def until_final(self, ids: set[str], timeout: float = 120.0) -> dict[str, list]:
        """Every response until each of `ids` got its final one."""
        got: dict[str, list] = {i: [] for i in ids}
        done: set[str] = set()
        deadline = time.monotonic() + timeout
        while done != ids:
            rid, final, result, error = self.get(max(0.1, deadline - time.monotonic()))
            assert error is None, error
            got[rid].append((final, result))
            if final:
                done.add(rid)
        return got


# ------------------------------------------------------------------------------------------- health
def test_health_metadata_config_and_index(served: Served) -> None:
    client = served.client()
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("tiny")
    assert client.is_model_ready("tiny", "1")
    assert not client.is_model_ready("tiny", "2")
    assert not client.is_model_ready("no-such-model")

    server = client.get_server_metadata()
    assert server.name == "gptserve" and server.version and "statistics" in server.extensions

    meta = client.get_model_metadata("tiny")
    assert meta.name == "tiny" and list(meta.versions) == ["1"] and meta.platform == "gptserve"
    inputs = {t.name: (t.datatype, list(t.shape)) for t in meta.inputs}
    assert inputs["input_ids"] == ("UINT32", [-1, -1])
    assert inputs["input_lengths"] == ("UINT32", [-1, 1])
    assert inputs["random_seed"] == ("UINT64", [-1, 1])
    outputs = {t.name: (t.datatype, list(t.shape)) for t in meta.outputs}
    assert outputs["output_ids"] == ("UINT32", [-1, -1, -1])

    config = client.get_model_config("tiny").config
    assert config.name == "tiny" and config.max_batch_size > 0
    assert config.model_transaction_policy.decoupled  # it streams a request that asks (`stream`)
    assert client.get_model_config("tiny-decoupled").config.model_transaction_policy.decoupled

    index = {(m.name, m.version, m.state) for m in client.get_model_repository_index().models}
    assert index == {("tiny", "1", "READY"), ("tiny-decoupled", "1", "READY")}


# ---------------------------------------------------------------------------------------- ModelInfer
def test_infer_token_form_equals_hf_greedy(served: Served) -> None:
    client = served.client()
    before = client.get_inference_statistics("tiny").model_stats[0]
    n = 8
    result = client.infer(
        "tiny",
        ft_inputs(PROMPTS, n, log_probs=True),
        request_id="req-1",
        outputs=[
            grpcclient.InferRequestedOutput(name)
            for name in ("output_ids", "sequence_length", "output_log_probs")
        ],
    )
    assert result.get_response().id == "req-1"
    assert result.get_response().model_name == "tiny" and result.get_response().model_version == "1"
    output_ids = result.as_numpy("output_ids")
    lengths = result.as_numpy("sequence_length")
    log_probs = result.as_numpy("output_log_probs")
    assert result.as_numpy("cum_log_probs") is None  # not requested
    width = max(len(p) for p in PROMPTS)
    assert output_ids.shape == (2, 1, width + n) and output_ids.dtype == np.uint32
    assert lengths.shape == (2, 1) and log_probs.shape == (2, 1, n)
    for row, prompt in enumerate(PROMPTS):
        expected, hf_log_probs = hf_greedy(served.hf, prompt, n)
        assert lengths[row, 0] == len(prompt) + n
        assert output_ids[row, 0, : len(prompt) + n].tolist() == prompt + expected
        want = hf_log_probs[torch.arange(n), torch.tensor(expected)].numpy()
        np.testing.assert_allclose(log_probs[row, 0], want, atol=1e-3)

    after = client.get_inference_statistics("tiny").model_stats[0]
    assert after.name == "tiny" and after.version == "1"
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1
    assert after.inference_count == before.inference_count + 2
    assert after.last_inference > 0


def test_infer_rejects_decoupled_model(served: Served) -> None:
    status, message = status_of(lambda: served.client().infer("tiny-decoupled", ft_inputs(PROMPTS[:1], 2)))
    assert status == "StatusCode.UNIMPLEMENTED"
    assert message == "ModelInfer RPC doesn't support models with decoupled transaction policy"


def test_infer_errors_have_statuses_and_leave_the_server_ready(served: Served) -> None:
    client = served.client()
    good = ft_inputs(PROMPTS[:1], 2)

    status, message = status_of(lambda: client.infer("no-such-model", good))
    assert status == "StatusCode.NOT_FOUND" and "no-such-model" in message
    status, message = status_of(lambda: client.infer("tiny", good, model_version="3"))
    assert status == "StatusCode.NOT_FOUND"

    as_text = [tensor("input_ids", np.array([[b"5 17"]], dtype=object))] + good[1:]
    status, message = status_of(lambda: client.infer("tiny", as_text))
    assert status == "StatusCode.INVALID_ARGUMENT" and "'input_ids'" in message and "BYTES" in message

    as_float = [tensor("input_ids", np.array([[5.0, 17.0]], np.float32))] + good[1:]
    status, message = status_of(lambda: client.infer("tiny", as_float))
    assert status == "StatusCode.INVALID_ARGUMENT" and "input_ids" in message

    wrong_rank = [tensor("input_ids", np.zeros((1, 1, 4), np.uint32))] + good[1:]
    status, message = status_of(lambda: client.infer("tiny", wrong_rank))
    assert status == "StatusCode.INVALID_ARGUMENT" and "input_ids" in message

    short = tensor("input_ids", np.zeros((1, 4), np.uint32)).set_shape([1, 5])
    status, message = status_of(lambda: client.infer("tiny", [short] + good[1:]))
    assert status == "StatusCode.INVALID_ARGUMENT" and "'input_ids'" in message and "16" in message

    status, message = status_of(lambda: client.infer("tiny", good[:2]))
    assert status == "StatusCode.INVALID_ARGUMENT" and "request_output_len" in message

    unknown = good + [tensor("prompt_text", np.array([[b"hi"]], dtype=object))]
    status, message = status_of(lambda: client.infer("tiny", unknown))
    assert status == "StatusCode.INVALID_ARGUMENT" and "'prompt_text'" in message

    status, message = status_of(
        lambda: client.infer("tiny", good, outputs=[grpcclient.InferRequestedOutput("no_output")])
    )
    assert status == "StatusCode.INVALID_ARGUMENT" and "'no_output'" in message

    assert client.is_server_ready() and client.is_model_ready("tiny")
    assert client.infer("tiny", good).as_numpy("sequence_length")[0, 0] == len(PROMPTS[0]) + 2
    served.wait_idle()


def test_unary_call_cancelled_by_deadline_aborts_the_engine_request(served: Served) -> None:
    served.wait_idle()
    aborted = served.aborted()
    status, _ = status_of(
        lambda: served.client().infer("tiny", ft_inputs(PROMPTS[:1], LONG), client_timeout=0.5)
    )
    assert status == "StatusCode.DEADLINE_EXCEEDED"
    served.wait_idle(timeout=30)
    assert served.aborted() == aborted + 1


# ----------------------------------------------------------------------------------- ModelStreamInfer
def check_stream(responses: list, prompt: list[int], n: int, served: Served) -> None:
    """Per-step responses: growing `output_ids`, only the last final, ending in HF's greedy tokens."""
    assert len(responses) > 1
    assert [final for final, _ in responses] == [False] * (len(responses) - 1) + [True]
    lengths = [int(r.as_numpy("sequence_length")[0, 0]) for _, r in responses]
    assert lengths == sorted(set(lengths)) and len(prompt) < lengths[0] and lengths[-1] == len(prompt) + n
    expected, _ = hf_greedy(served.hf, prompt, n)
    last = responses[-1][1].as_numpy("output_ids")[0, 0]
    assert last[: len(prompt) + n].tolist() == prompt + expected
    for (_, r), length in zip(responses, lengths):
        assert r.as_numpy("output_ids")[0, 0, :length].tolist() == (prompt + expected)[:length]


def test_stream_per_step_responses_with_final_flag(served: Served) -> None:
    client = served.client()
    collector = StreamCollector()
    client.start_stream(collector)
    try:
        n = 12
        client.async_stream_infer("tiny", ft_inputs(PROMPTS[:1], n, stream=True), request_id="s1")
        client.async_stream_infer("tiny-decoupled", ft_inputs(PROMPTS[1:], n), request_id="s2")
        got = collector.until_final({"s1", "s2"})
        check_stream(got["s1"], PROMPTS[0], n, served)
        check_stream(got["s2"], PROMPTS[1], n, served)

        client.async_stream_infer(
            "tiny-decoupled", ft_inputs(PROMPTS[:1], 4), request_id="e1", enable_empty_final_response=True
        )
        responses = collector.until_final({"e1"})["e1"]
        assert [final for final, _ in responses] == [False] * (len(responses) - 1) + [True]
        assert len(responses) > 2
        empty = responses[-1][1].get_response()
        assert len(empty.outputs) == 0 and empty.id == "e1" and empty.model_name == "tiny-decoupled"
        assert responses[-2][1].as_numpy("sequence_length")[0, 0] == len(PROMPTS[0]) + 4

        client.async_stream_infer("tiny", ft_inputs(PROMPTS[:1], 3), request_id="one")
        (only,) = collector.until_final({"one"})["one"]
        assert only[1].as_numpy("sequence_length")[0, 0] == len(PROMPTS[0]) + 3
    finally:
        client.stop_stream()
    served.wait_idle()


def test_stream_errors_do_not_close_the_stream(served: Served) -> None:
    client = served.client()
    collector = StreamCollector()
    client.start_stream(collector)
    try:
        client.async_stream_infer("no-such-model", ft_inputs(PROMPTS[:1], 2), request_id="bad1")
        *_, error = collector.get()
        assert "no-such-model" in error.message()
        bad = [tensor("input_ids", np.array([[b"x"]], dtype=object))] + ft_inputs(PROMPTS[:1], 2)[1:]
        client.async_stream_infer("tiny", bad, request_id="bad2")
        *_, error = collector.get()
        assert "'input_ids'" in error.message()
        client.async_stream_infer("tiny", ft_inputs(PROMPTS[:1], 2, stream=True), request_id="ok")
        assert collector.until_final({"ok"})["ok"][-1][0] is True
    finally:
        client.stop_stream()
    assert client.is_server_ready()


def test_closing_a_stream_aborts_its_requests_and_frees_kv(served: Served) -> None:
    served.wait_idle()
    aborted = served.aborted()
    client = served.client()
    collector = StreamCollector()
    client.start_stream(collector)
    client.async_stream_infer("tiny", ft_inputs(PROMPTS[:1], LONG, stream=True), request_id="long-1")
    client.async_stream_infer("tiny-decoupled", ft_inputs(PROMPTS[1:], LONG), request_id="long-2")
    seen: set[str] = set()
    while seen != {"long-1", "long-2"}:
        rid, final, _, error = collector.get()
        assert error is None and not final
        seen.add(rid)
    assert served.engine.core.kv.usage > 0
    client.stop_stream(cancel_requests=True)
    served.wait_idle(timeout=30)
    assert served.aborted() == aborted + 2
    assert client.is_server_ready()


# ------------------------------------------------------------------------------- auth, unsupported
def test_api_key_guards_every_call_but_health(served: Served) -> None:
    client = served.client(keyed=True)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")

    for headers in (None, {"authorization": "Bearer wrong"}, {"authorization": API_KEY}):
        for call in (
            lambda h=headers: client.get_server_metadata(headers=h),
            lambda h=headers: client.get_model_metadata("tiny", headers=h),
            lambda h=headers: client.get_model_config("tiny", headers=h),
            lambda h=headers: client.get_inference_statistics(headers=h),
            lambda h=headers: client.get_model_repository_index(headers=h),
            lambda h=headers: client.unload_model("tiny", headers=h),
            lambda h=headers: client.infer("tiny", ft_inputs(PROMPTS[:1], 2), headers=h),
        ):
            status, _ = status_of(call)
            assert status == "StatusCode.UNAUTHENTICATED"

    collector = StreamCollector()
    client.start_stream(collector)
    with contextlib.suppress(InferenceServerException):  # the stream may be refused before the request
        client.async_stream_infer("tiny", ft_inputs(PROMPTS[:1], 2))
    *_, error = collector.get()
    assert "StatusCode.UNAUTHENTICATED" in str(error.status())
    client.stop_stream()

    assert client.get_server_metadata(headers=AUTH).name == "gptserve"
    result = client.infer("tiny", ft_inputs(PROMPTS[:1], 2), headers=AUTH)
    assert result.as_numpy("sequence_length")[0, 0] == len(PROMPTS[0]) + 2
    client.start_stream(collector, headers=AUTH)
    client.async_stream_infer("tiny", ft_inputs(PROMPTS[:1], 2, stream=True), request_id="k")
    assert collector.until_final({"k"})["k"][-1][0] is True
    client.stop_stream()


def test_repository_control_and_unsupported_calls(served: Served) -> None:
    client = served.client()
    status, message = status_of(lambda: client.load_model("tiny"))
    assert status == "StatusCode.UNAVAILABLE" and "model control mode" in message
    status, message = status_of(lambda: client.unload_model("tiny"))
    assert status == "StatusCode.UNAVAILABLE" and "model control mode" in message
    assert client.is_model_ready("tiny")

    status, _ = status_of(lambda: client.get_trace_settings())
    assert status == "StatusCode.UNIMPLEMENTED"
    status, _ = status_of(lambda: client.update_log_settings({"log_verbose_level": 1}))
    assert status == "StatusCode.UNIMPLEMENTED"
    status, message = status_of(lambda: client.register_system_shared_memory("r", "/key", 64))
    assert status == "StatusCode.UNIMPLEMENTED" and "shared memory" in message
    assert len(client.get_system_shared_memory_status().regions) == 0
    assert len(client.get_cuda_shared_memory_status().regions) == 0
    client.unregister_system_shared_memory()
    status, _ = status_of(lambda: client.get_system_shared_memory_status("r"))
    assert status == "StatusCode.NOT_FOUND"


def test_standard_grpc_health_service(served: Served) -> None:
    import grpc

    try:
        from grpc_health.v1 import health_pb2, health_pb2_grpc
    except Exception as e:  # absent, or built for another protobuf major version
        pytest.skip(f"grpcio-health-checking is not usable: {e}")

    with grpc.insecure_channel(served.keyed_url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            response = stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
