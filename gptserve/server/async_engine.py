"""`AsyncEngine`: the engine core on its own thread, with an asyncio face for the HTTP server.

One dedicated thread owns the `LLMEngine` and is the only code that touches it. It never waits on HTTP:
new requests and aborts reach it through an inbox (a list under a condition variable, held only for an
append or a swap) that it drains at the top of every step; the token ids a step produced go back to the
event loop in one `loop.call_soon_threadsafe` call, which never blocks. Detokenization and stop strings
run on the event loop (`OutputProcessor`); a sequence a stop string ended is stopped in the engine
through the inbox, and tokens it produced meanwhile are dropped. When there is nothing to do the thread
sleeps on the condition variable. On the event loop side each request has a `RequestStream` that the
HTTP handler iterates; leaving the iteration early (a client that went away) aborts the request in the
engine at once, which frees its KV blocks in the next iteration of the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from gptserve.engine.llm_engine import LLMEngine
from gptserve.engine.output_processor import OutputProcessor
from gptserve.errors import GptServeError, InvalidRequestError, QueueFullError, RequestTimeoutError
from gptserve.outputs import RequestOutput
from gptserve.sampling_params import SamplingParams
from gptserve.server.metrics import EngineStats, ServerMetrics
from gptserve.server.request_stream import RequestStream

logger = logging.getLogger(__name__)


class EngineDeadError(GptServeError):
    """The engine thread stopped (crashed or shut down); no request can be served any more."""


class AsyncEngine:
    """Serves an `LLMEngine` to coroutines; `start()` on the event loop, `stop()` at shutdown.

    `max_queue_len` (waiting requests beyond which `check_capacity` refuses new ones) and
    `request_timeout` (seconds after which an admitted request is aborted and its stream fails with
    `RequestTimeoutError`) are the serve flags of the same names; None = no limit."""

    def __init__(self, engine: LLMEngine, metrics: ServerMetrics | None = None):
        self.engine = engine
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
        self._num_unadmitted = 0
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

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer: send token ids instead of text", "prompt")
        return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    @property
    def queue_depth(self) -> int:
        """Requests not yet running: waiting in the scheduler or not yet admitted."""
        return self.stats.num_waiting + self._num_unadmitted

    def check_capacity(self, num_requests: int) -> None:
        """Raises `QueueFullError` if `num_requests` more would overflow `max_queue_len`."""
        limit = self.max_queue_len
        if limit is not None and self.queue_depth + num_requests > limit:
            raise QueueFullError(f"the server is at its queue limit ({limit} waiting requests); retry later")

    async def add_request(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> RequestStream:
        """Queue a request and wait until the engine admitted it; raises `InvalidRequestError` if it
        refused it, `EngineDeadError` if the engine is gone."""
        if self.dead or self._stopping or self._loop is None:
            raise EngineDeadError("the engine is not running")
        if request_id in self._streams:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        stream = RequestStream(request_id, len(prompt_token_ids), self.abort)
        self._streams[request_id] = stream
        self.processor.add_request(request_id, list(prompt_token_ids), params)
        self._num_unadmitted += 1
        self._submit(("add", request_id, list(prompt_token_ids), params))
        try:
            await stream.admitted
        except asyncio.CancelledError:
            self.abort(request_id)  # queued behind the add, so it always finds the request
            raise
        if self.request_timeout is not None and self._loop is not None:
            self._loop.call_later(self.request_timeout, self._expire, request_id, stream)
        return stream

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
        token_ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        stream = await self.add_request(request_id, token_ids, params)
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
        self,
        admitted: list[tuple[str, BaseException | None]],
        outputs: list[RequestOutput],
        now: float,
        stats: EngineStats,
    ) -> None:
        """Runs on the event loop: hand one engine iteration's results to their streams."""
        self.stats = stats
        for request_id, error in admitted:
            self._num_unadmitted -= 1
            stream = self._streams.get(request_id)
            if stream is None:
                continue
            if error is not None:
                self.processor.drop(request_id)
                del self._streams[request_id]
                if not stream.admitted.done():
                    stream.admitted.set_exception(error)
                continue
            if stream.log_record is not None:
                stream.log_record.prompt_tokens += stream.num_prompt_tokens
            if self.metrics is not None:
                self.metrics.prompt_tokens.inc(stream.num_prompt_tokens)
            if not stream.admitted.done():
                stream.admitted.set_result(None)
        for engine_out in outputs:
            out, stopped = self.processor.process(engine_out)
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
            if not stream.admitted.done():
                stream.admitted.set_exception(error)
            else:
                stream.put(error)

    def _died(self, error: BaseException) -> None:
        self._fail_all(EngineDeadError(f"the engine failed: {type(error).__name__}: {error}"))
        for callback in self.on_dead:
            callback(error)

    # --------------------------------------------------------------------------------- engine thread
    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                with self._cond:
                    while not (self._inbox or self._stopping or engine.has_unfinished_requests()):
                        self._cond.wait()
                    commands, self._inbox = self._inbox, []
                    stopping = self._stopping
                if stopping:
                    return
                admitted = self._apply(commands)
                outputs = engine.step_tokens() if engine.has_unfinished_requests() else []
                assert self._loop is not None
                self._loop.call_soon_threadsafe(
                    self._deliver, admitted, outputs, time.monotonic(), self._snapshot()
                )
        except BaseException as e:
            logger.exception("the engine thread failed; the server is no longer able to serve")
            self.error = e
            self.dead = True
            if self._loop is not None and not self._loop.is_closed():
                # The loop may close meanwhile, and then nobody is left to tell.
                with contextlib.suppress(RuntimeError):
                    self._loop.call_soon_threadsafe(self._died, e)

    def _apply(self, commands: list[tuple[Any, ...]]) -> list[tuple[str, BaseException | None]]:
        admitted: list[tuple[str, BaseException | None]] = []
        for command in commands:
            if command[0] == "add":
                _, request_id, prompt, params = command
                try:
                    self.engine.add_request(request_id, prompt, params, detokenize=False)
                    admitted.append((request_id, None))
                except Exception as e:  # refused: the caller gets the error, the engine goes on
                    admitted.append((request_id, e))
            elif command[0] == "stop":
                self.engine.finish_sequence(*command[1:])
            else:
                self.engine.abort_request(command[1])
        return admitted

    def _snapshot(self) -> EngineStats:
        engine = self.engine
        return EngineStats(
            num_running=len(engine.scheduler.running),
            num_waiting=len(engine.scheduler.waiting),
            kv_cache_usage=engine.kv.usage,
            num_preemptions=engine.scheduler.num_preemptions,
            prefix_cache_queries=engine.kv.prefix_queries,
            prefix_cache_hits=engine.kv.prefix_hits,
        )
