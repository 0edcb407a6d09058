"""`AsyncEngine`: the engine core on its own thread, with an asyncio face for both front-ends.

One dedicated thread owns the `EngineCore` and is the only code that touches it. It never waits on HTTP,
tokenization or detokenization: requests arrive already validated by the input processor, and new
requests, aborts and stop-string endings reach it through an inbox (a list under a condition variable,
held only for an append or a swap) that it drains at the top of every step; the token deltas a step
produced go back to the event loop in one `loop.call_soon_threadsafe` call, which never blocks.
Admission does not wait for the thread: `add_request` returns the request's stream at once (a request
the core can never fit comes back as an error output). Accumulation, detokenization and stop strings run
on the event loop (`OutputProcessor`); a sequence a stop string ended is stopped in the core through the
inbox, and tokens it produced meanwhile are dropped. When there is nothing to do the thread sleeps on
the condition variable. Leaving a `RequestStream`'s iteration early (a client that went away) aborts
the request in the core at once, which frees its KV blocks in the next iteration of the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from gptserve.engine.core_io import EngineCoreOutput, EngineCoreRequest
from gptserve.engine.llm_engine import LLMEngine
from gptserve.engine.output_processor import OutputProcessor
from gptserve.errors import EngineDeadError, InvalidRequestError, QueueFullError, RequestTimeoutError
from gptserve.frontend.metrics import EngineStats, ServerMetrics
from gptserve.frontend.request_stream import RequestStream
from gptserve.outputs import RequestOutput
from gptserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class AsyncEngine:
    """Serves an `LLMEngine` to coroutines; `start()` on the event loop, `stop()` at shutdown.

    `max_queue_len` (waiting requests beyond which `check_capacity` refuses new ones) and
    `request_timeout` (seconds after which an admitted request is aborted and its stream fails with
    `RequestTimeoutError`) are the serve flags of the same names; None = no limit."""

    def __init__(self, engine: LLMEngine, metrics: ServerMetrics | None = None):
        self.engine = engine
        self.core = engine.core
        self.inputs = engine.input_processor
        self.metrics = metrics
        self.max_queue_len: int | None = None
        self.request_timeout: float | None = None
        self.stats = EngineStats()  # replaced (never mutated) after every engine iteration
        self.processor = OutputProcessor(engine.tokenizer, engine.eos_token_ids)
        self.dead = False
        self.error: BaseException | None = None
        self.on_dead: list[Callable[[BaseException], Any]] = []
        self._cond = threading.Condition()
        self._inbox: list[tuple[Any, ...]] = []
        self._stopping = False
        self._streams: dict[str, RequestStream] = {}
        self._num_unadmitted = 0  # added on the event loop, not yet seen by the engine thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------ event-loop side
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="gptserve-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Stop the engine thread; requests still in flight end with `EngineDeadError`."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self._fail_all(EngineDeadError("the server is shutting down"))

    @property
    def queue_depth(self) -> int:
        """Requests not yet running: waiting in the scheduler or not yet seen by the engine thread."""
        return self.stats.num_waiting + self._num_unadmitted

    def check_capacity(self, num_requests: int) -> None:
        """Raises `QueueFullError` if `num_requests` more would overflow `max_queue_len`."""
        limit = self.max_queue_len
        if limit is not None and self.queue_depth + num_requests > limit:
            raise QueueFullError(f"the server is at its queue limit ({limit} waiting requests); retry later")

    def check_alive(self) -> None:
        if self.dead or self._stopping or self._loop is None:
            raise EngineDeadError("the engine is not running")

    def add_request(self, request: EngineCoreRequest, prompt: str | None = None) -> RequestStream:
        """Queue a request the input processor produced; returns its stream at once. Raises
        `EngineDeadError` if the engine is gone."""
        self.check_alive()
        request_id = request.request_id
        if request_id in self._streams:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        num_prompt_tokens = len(request.prompt_token_ids)
        stream = RequestStream(request_id, num_prompt_tokens, self.abort)
        self._streams[request_id] = stream
        self.processor.add_request(request_id, request.prompt_token_ids, request.params, prompt)
        if stream.log_record is not None:
            stream.log_record.prompt_tokens += num_prompt_tokens
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(num_prompt_tokens)
        self._num_unadmitted += 1
        self._submit(("add", request))
        if self.request_timeout is not None and self._loop is not None:
            self._loop.call_later(self.request_timeout, self._expire, request_id, stream)
        return stream

    def admit(self, requests: Sequence[EngineCoreRequest]) -> list[RequestStream]:
        """Queue several requests together (the prompts of one API call, the rows of one Triton batch):
        all of them or, when the queue limit or a dead engine refuses, none."""
        self.check_alive()
        self.check_capacity(len(requests))
        return [self.add_request(r) for r in requests]

    def _expire(self, request_id: str, stream: RequestStream) -> None:
        """The request outlived `request_timeout`: abort it in the engine and fail its stream."""
        if self._streams.get(request_id) is not stream:
            return  # finished or aborted meanwhile
        del self._streams[request_id]
        self.processor.drop(request_id)
        self.abort(request_id)
        if self.metrics is not None:
            self.metrics.request_finished("abort")
        stream.put(
            RequestTimeoutError(
                f"the request ran longer than the server's limit of {self.request_timeout:g} seconds "
                "(--request-timeout) and was aborted"
            )
        )

    async def generate(
        self, prompt: str | Sequence[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as the engine produces them; closing the iterator early aborts it."""
        request = self.inputs.process(request_id, prompt, params)
        stream = self.add_request(request, prompt if isinstance(prompt, str) else None)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def abort(self, request_id: str) -> None:
        self._submit(("abort", request_id))

    def _submit(self, command: tuple[Any, ...]) -> None:
        with self._cond:
            self._inbox.append(command)
            self._cond.notify()

    def _deliver(
        self, num_admitted: int, outputs: list[EngineCoreOutput], now: float, stats: EngineStats
    ) -> None:
        """Runs on the event loop: hand one engine iteration's results to their streams."""
        self.stats = stats
        self._num_unadmitted -= num_admitted
        for core_out in outputs:
            out, stopped = self.processor.process(core_out)
            if out is None:
                continue
            for c in out.outputs:
                if c.index in stopped:
                    self._submit(("stop", out.request_id, c.index, c.stop_reason))
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            self._record(stream, out, now)
            if out.finished:
                del self._streams[out.request_id]
            stream.put(out)

    def _record(self, stream: RequestStream, out: RequestOutput, now: float) -> None:
        num_new = sum(len(c.delta_token_ids) for c in out.outputs)
        if stream.log_record is not None:
            stream.log_record.add_output(num_new, now)
        m = self.metrics
        if m is None:
            return
        if num_new:
            m.generation_tokens.inc(num_new)
            if stream.first_token_time is None:
                stream.first_token_time = now
                m.ttft.observe(now - stream.arrival_time)
            elif stream.last_token_time is not None:
                m.itl.observe(now - stream.last_token_time)
            stream.last_token_time = now
        if out.finished:
            m.e2e.observe(now - stream.arrival_time)
            reasons = [c.finish_reason for c in out.outputs]
            m.request_finished("abort" if "abort" in reasons or not reasons else str(reasons[0]))

    def _fail_all(self, error: BaseException) -> None:
        streams, self._streams = self._streams, {}
        for request_id in streams:
            self.processor.drop(request_id)
        for stream in streams.values():
            stream.put(error)

    def _died(self, error: BaseException) -> None:
        self._fail_all(EngineDeadError(f"the engine failed: {type(error).__name__}: {error}"))
        for callback in self.on_dead:
            callback(error)

    # --------------------------------------------------------------------------------- engine thread
    def _run(self) -> None:
        core = self.core
        try:
            while True:
                with self._cond:
                    while not (self._inbox or self._stopping or core.has_unfinished_requests()):
                        self._cond.wait()
                    commands, self._inbox = self._inbox, []
                    stopping = self._stopping
                if stopping:
                    return
                num_admitted = self._apply(commands)
                outputs = core.step() if core.has_unfinished_requests() else []
                assert self._loop is not None
                self._loop.call_soon_threadsafe(
                    self._deliver, num_admitted, outputs, time.monotonic(), self._snapshot()
                )
        except BaseException as e:
            logger.exception("the engine thread failed; the server is no longer able to serve")
            self.error = e
            self.dead = True
            if self._loop is not None and not self._loop.is_closed():
                # The loop may close meanwhile, and then nobody is left to tell.
                with contextlib.suppress(RuntimeError):
                    self._loop.call_soon_threadsafe(self._died, e)

    def _apply(self, commands: list[tuple[Any, ...]]) -> int:
        """Carry out the inbox's commands in order; returns how many requests were added."""
        num_added = 0
        for command in commands:
            if command[0] == "add":
                self.core.add_request(command[1])
                num_added += 1
            elif command[0] == "stop":
                self.core.finish_sequence(*command[1:])
            else:
                self.core.abort_request(command[1])
        return num_added

    def _snapshot(self) -> EngineStats:
        scheduler, kv = self.core.scheduler, self.core.kv
        return EngineStats(
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            kv_cache_usage=kv.usage,
            num_preemptions=scheduler.num_preemptions,
            prefix_cache_queries=kv.prefix_queries,
            prefix_cache_hits=kv.prefix_hits,
        )
