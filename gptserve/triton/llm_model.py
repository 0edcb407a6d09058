"""`LLMModel`: a generating model served to Triton clients over an `AsyncEngine`.

Two shapes share one implementation. A FasterTransformer `config.pbtxt` (`backend: "fastertransformer"`)
gives the model exactly that config's tensors. The model served without a repository gets a synthesised
config whose inputs are all optional: the text form of Triton's LLM backends (`text_input`, `max_tokens`,
`stream` -> `text_output`, with TensorRT-LLM's `stop_words` and `bad_words` as strings: `text_words`)
and FT's token form (`input_ids`, `input_lengths`, `request_output_len` -> `output_ids`,
`sequence_length`, log-probs), with the FT sampling scalars in both.

Every row of a batch is its own engine request, submitted together and batched continuously with all
other traffic; nothing waits for the longest row. Only a model whose config is decoupled streams (the
served model's config is; an FT config that is not answers each request once, streamed or not, as
Triton does), every request in FT's decoupled mode, else a request whose `stream` input or parameter is
true. Streaming answers as it goes: the token form once per generated token (as
FT's decoupled mode; beam search once per step) with the full `output_ids`/`sequence_length` so far,
the text form once per engine step with the text added since the previous response (its last
response also carries `sequence_length`: the tokens of the sequence `text_output` holds, as in FT). Closing
the stream or cancelling the caller aborts every row, which frees its KV blocks.

In the text form `text_output` is [batch, beams]; without streaming it starts with the prompt, as in
Triton's vLLM backend, unless `exclude_input_in_output` is true.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from gptserve.engine.core_io import EngineCoreRequest
from gptserve.errors import GptServeError, InvalidRequestError, QueueFullError
from gptserve.frontend.async_engine import AsyncEngine
from gptserve.frontend.request_stream import RequestStream, abort_all, merge_batches
from gptserve.outputs import RequestOutput
from gptserve.sampling_params import SamplingParams
from gptserve.triton import ft_tensors as ft
from gptserve.triton.text_defaults import with_model_defaults, with_model_min_p
from gptserve.triton.text_words import WORD_INPUTS, with_words
from gptserve.triton.types import (
    InferRequest,
    InferResponse,
    TritonError,
    TritonModel,
    check_request,
    config_type_of_datatype,
    make_response,
    tensor_specs,
)

SERVED_MAX_BATCH_SIZE = 1024  # as FT's GPT-J config; rows beyond the engine's running limit wait in its queue
DEFAULT_MAX_TOKENS = 16

# The synthesised config of a served model: (name, datatype, dims) of every input and output.
TEXT_INPUTS = [("text_input", "BYTES", [1]), ("max_tokens", "INT32", [1]), ("stream", "BOOL", [1])]
TEXT_INPUTS.append(("exclude_input_in_output", "BOOL", [1]))
TEXT_INPUTS += [(name, "BYTES", [-1]) for name in WORD_INPUTS]
TOKEN_INPUTS = [
    ("input_ids", "UINT32", [-1]),
    ("input_lengths", "UINT32", [1]),
    ("request_output_len", "UINT32", [-1]),
    ("bad_words_list", "INT32", [2, -1]),
    ("stop_words_list", "INT32", [2, -1]),
]
SERVED_OUTPUTS = [
    ("text_output", "BYTES", [-1]),
    ("output_ids", "UINT32", [-1, -1]),
    ("sequence_length", "UINT32", [-1]),
    ("cum_log_probs", "FP32", [-1]),
    ("output_log_probs", "FP32", [-1, -1]),
]


def served_config(name: str) -> mc.ModelConfig:
    """The config a model served without a repository shows to Triton clients."""
    config = mc.ModelConfig(name=name, backend="gptserve", max_batch_size=SERVED_MAX_BATCH_SIZE)
    scalars = [(n, t, [1]) for n, t in ft.SCALAR_INPUTS.items()]
    for tensor_name, datatype, dims in TEXT_INPUTS + TOKEN_INPUTS + scalars:
        config.input.add(
            name=tensor_name, data_type=config_type_of_datatype(datatype), dims=dims, optional=True
        )
    for tensor_name, datatype, dims in SERVED_OUTPUTS:
        config.output.add(name=tensor_name, data_type=config_type_of_datatype(datatype), dims=dims)
    # Decoupled: a request whose `stream` input or parameter is true is answered once per step. Others
    # get one response, which is why the infer routes serve them too.
    config.model_transaction_policy.decoupled = True
    return config


def _truthy(value: Any) -> bool:
    if isinstance(value, np.ndarray):
        return bool(value.size and value.reshape(-1)[0])
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


@dataclass
class _Job:
    """A parsed request: what to submit and how to render the engine's outputs."""

    prompts: list[list[int]]
    params: list[SamplingParams]
    token_request: ft.TokenRequest | None = None  # the token form
    prompt_texts: list[str] | None = None  # the text form
    exclude_input: bool = False


class LLMModel(TritonModel):
    """A Triton model over one `AsyncEngine` (FT token form, and the text form where configured)."""

    def __init__(
        self, name: str, version: str, config: mc.ModelConfig, engine: AsyncEngine, owns_engine: bool = True
    ):
        super().__init__()
        self.name = name
        self.version = version
        self.config = config
        self.engine = engine
        self.owns_engine = owns_engine  # started and stopped with the model
        self.inputs, self.outputs = tensor_specs(config)
        self._started = False
        llm = engine.engine
        self.eos_token_ids: set[int] = set(llm.eos_token_ids)
        end_id = config.parameters["end_id"].string_value if "end_id" in config.parameters else ""
        self.default_end_id = int(end_id) if end_id else min(self.eos_token_ids, default=None)
        # A decoupled model streams every request (FT's decoupled mode), or only those that ask for it
        # (the served model, as Triton's LLM backends: its `stream` input or parameter).
        self.streams_on_request = False

    @classmethod
    def served(cls, name: str, engine: AsyncEngine) -> LLMModel:
        """The model `gptserve serve MODEL` serves; its engine belongs to the caller."""
        model = cls(name, "1", served_config(name), engine, owns_engine=False)
        model.streams_on_request = True
        return model

    async def start(self) -> None:
        if self.owns_engine and not self._started:
            self.engine.start()
            self._started = True

    async def stop(self) -> None:
        if self.owns_engine and self._started:
            self._started = False
            await self.engine.stop()

    @property
    def ready(self) -> bool:
        return not self.engine.dead

    # ------------------------------------------------------------------------------------- requests
    def wants_stream(self, request: InferRequest) -> bool:
        """Per-step responses, only from a decoupled model (a model whose config is not decoupled answers
        once, as Triton does): asked by the request's `stream` input or parameter, else FT's decoupled
        mode streaming every request."""
        if not self.decoupled:
            return False
        if "stream" in request.inputs:
            return _truthy(request.inputs["stream"])
        if "stream" in request.parameters:
            return _truthy(request.parameters["stream"])
        return not self.streams_on_request

    def answers_once(self, request: InferRequest) -> bool:
        return not self.wants_stream(request)

    async def infer(self, request: InferRequest) -> InferResponse:
        last = None
        async for response in self._run(request, streaming=False):
            last = response
        assert last is not None
        return last

    async def stream(self, request: InferRequest) -> AsyncIterator[InferResponse]:
        async with contextlib.aclosing(self._run(request, self.wants_stream(request))) as responses:
            async for response in responses:
                yield response

    def _parse(self, request: InferRequest) -> _Job:
        inputs = request.inputs
        extra = dict(request.parameters)
        if "max_tokens" in inputs:
            extra["max_tokens"] = int(np.asarray(inputs["max_tokens"]).reshape(-1)[0])
        if "text_input" in inputs:
            if "input_ids" in inputs:
                raise TritonError("send either 'text_input' or 'input_ids', not both")
            return self._parse_text(request, extra)
        if "input_ids" not in inputs:
            raise TritonError(f"model '{self.name}' expects 'input_ids' (or 'text_input' for text)")
        for name in WORD_INPUTS:
            if name in inputs:
                raise TritonError(
                    f"input '{name}' (strings) goes with 'text_input'; with 'input_ids' send token ids "
                    f"in '{name}_list'"
                )
        token_request = ft.parse_token_request(inputs, self.eos_token_ids, self.default_end_id, extra)
        return _Job(token_request.prompts, token_request.params, token_request=token_request)

    def _engine_requests(self, job: _Job, request: InferRequest, base_id: str) -> list[EngineCoreRequest]:
        """Every row through the model's input processor. A row whose prompt plus requested output exceeds
        the context is refused, as the OpenAI routes refuse it: the token form's output tensors are sized
        by the requested length."""
        tensor = "input_ids" if "input_ids" in request.inputs else "text_input"
        length = "request_output_len" if "request_output_len" in request.inputs else "max_tokens"
        requests = []
        for row, (prompt, params) in enumerate(zip(job.prompts, job.params)):
            try:
                requests.append(
                    self.engine.inputs.process(
                        f"{base_id}-{row}", prompt, params, fit_max_tokens=True, max_tokens_param=length
                    )
                )
            except InvalidRequestError as e:
                raise TritonError(f"input '{tensor}' row {row}: {e}") from e
        return requests

    def _parse_text(self, request: InferRequest, extra: dict[str, Any]) -> _Job:
        texts = np.asarray(request.inputs["text_input"])
        flat = texts.reshape(-1) if texts.ndim <= 1 or texts.shape[-1] == 1 else None
        if flat is None or flat.size == 0:
            raise TritonError(f"input 'text_input' has shape {list(texts.shape)}; expected [batch, 1]")
        prompt_texts = [t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t) for t in flat]
        batch = len(prompt_texts)
        lens = ft.row_values(request.inputs.get("max_tokens"), "max_tokens", batch)
        lens = lens or ft.row_values(request.inputs.get("request_output_len"), "request_output_len", batch)
        if lens is None:
            lens = [int(extra.get("max_tokens", DEFAULT_MAX_TOKENS))] * batch
        if any(int(n) <= 0 for n in lens):
            raise TritonError(f"input 'max_tokens' must be > 0, got {[int(n) for n in lens]}")
        tokenize = self.engine.inputs.tokenize
        prompts = [tokenize(t) for t in prompt_texts]
        max_tokens = [int(n) for n in lens]
        defaults = self.engine.engine.sampling_defaults
        sampling_extra = with_model_defaults(defaults, request.inputs, extra)
        params, _ = ft.sampling_params(request.inputs, max_tokens, self.eos_token_ids, None, sampling_extra)
        params = with_model_min_p(defaults, params, extra)
        params = with_words(request, params, partial(tokenize, add_special_tokens=False))
        exclude = request.inputs.get("exclude_input_in_output", extra.get("exclude_input_in_output", False))
        return _Job(prompts, params, prompt_texts=prompt_texts, exclude_input=_truthy(exclude))

    async def _run(self, request: InferRequest, streaming: bool) -> AsyncIterator[InferResponse]:
        start = self.stats.begin()
        ok = False
        rows = 0
        try:
            check_request(self, request, shapes=False)
            job = self._parse(request)
            base_id = f"triton-{request.id or 'r'}-{uuid.uuid4().hex[:12]}"
            streams = self.engine.admit(self._engine_requests(job, request, base_id))
            rows = len(job.prompts)
            self.stats.queue.add(time.monotonic_ns() - start)
            texts: list[dict[int, str]] = [{} for _ in job.prompts]
            emitted = [0] * rows  # streamed token form: generated tokens each row has sent so far
            progress = contextlib.aclosing(self._progress(streams))
            async with progress as steps:
                async for latest, deltas, done in steps:
                    for row, delta in zip(texts, deltas):
                        for index, text in delta.items():
                            row[index] = row.get(index, "") + text
                    if streaming and job.token_request is not None:
                        for response in self._token_steps(request, job.token_request, latest, done, emitted):
                            yield response
                    elif streaming or done:
                        yield self._response(request, job, latest, texts if streaming else None, done)
                        texts = [{} for _ in job.prompts]
            ok = True
        except InvalidRequestError as e:
            message = str(e)
            if e.param == "prompt":  # the engine's name for it; the client sent a tensor
                tensor = "input_ids" if "input_ids" in request.inputs else "text_input"
                message = f"input '{tensor}': {message}"
            raise TritonError(message) from e
        except QueueFullError:
            raise  # each protocol has its own overload answer (HTTP 503 + Retry-After, RESOURCE_EXHAUSTED)
        except GptServeError as e:  # a timeout, or the engine stopped or failed (`EngineDeadError`)
            raise TritonError(str(e), e.http_status) from e
        finally:
            self.stats.record(start, rows, ok)

    async def _progress(
        self, streams: list[RequestStream]
    ) -> AsyncIterator[tuple[list[RequestOutput | None], list[dict[int, str]], bool]]:
        """The latest output of every row each time some rows progressed, with the text each sequence
        added meanwhile and whether all rows finished. Leaving early aborts the rows still running."""
        latest: list[RequestOutput | None] = [None] * len(streams)
        try:
            async with contextlib.aclosing(merge_batches(streams)) as batches:
                async for batch in batches:
                    deltas: list[dict[int, str]] = [{} for _ in streams]
                    for row, item in batch:
                        if item is None:
                            if latest[row] is None or not latest[row].finished:
                                raise TritonError("the request was aborted before it finished", 499)
                            continue
                        if item.error:
                            raise TritonError(item.error)
                        latest[row] = item
                        for c in item.outputs:
                            deltas[row][c.index] = deltas[row].get(c.index, "") + c.delta_text
                    done = all(o is not None and o.finished for o in latest)
                    yield latest, deltas, done
                    if done:
                        return
        finally:
            abort_all(streams)

    # -------------------------------------------------------------------------------------- outputs
    def _response(
        self,
        request: InferRequest,
        job: _Job,
        latest: list[RequestOutput | None],
        deltas: list[dict[int, str]] | None,
        final: bool,
    ) -> InferResponse:
        if job.token_request is not None:
            results = [_beams(out, job.token_request.beam_width) for out in latest]
            tensors = ft.assemble_outputs(job.token_request, results)
        else:
            tensors = {"text_output": self._texts(job, latest, deltas)}
            if final:  # the tokens behind the text, so that clients can tell counts and finish reasons
                tensors["sequence_length"] = self._text_lengths(job, latest, streamed=deltas is not None)
        return make_response(self, request, tensors, final)

    @staticmethod
    def _text_lengths(job: _Job, latest: list[RequestOutput | None], streamed: bool) -> np.ndarray:
        """The text form's `sequence_length` [batch, beams]: as in FT, the tokens of the sequence
        `text_output` holds: the generated ones, plus the prompt's where the output starts with it."""
        width = max(p.n for p in job.params)
        out = np.zeros((len(latest), width), dtype=np.uint32)
        for b, row in enumerate(latest):
            if row is None:
                continue
            prompt = 0 if streamed or job.exclude_input else len(row.prompt_token_ids or [])
            for c in row.outputs:
                if c.index < width:
                    out[b, c.index] = prompt + len(c.token_ids)
        return out

    def _token_steps(
        self,
        request: InferRequest,
        token_request: ft.TokenRequest,
        latest: list[RequestOutput | None],
        final: bool,
        emitted: list[int],
    ) -> list[InferResponse]:
        """Streamed token form: one response per generated token, as FT's decoupled mode sends, also for
        tokens that arrived together because the consumer fell behind. Beams are re-ranked every step,
        so beam search answers once per progress instead."""
        results = [_beams(out, token_request.beam_width) for out in latest]
        if token_request.beam_width > 1:
            return [make_response(self, request, ft.assemble_outputs(token_request, results), final)]
        lengths = [len(beams[0].token_ids) if beams else 0 for beams in results]
        steps = max(n - e for n, e in zip(lengths, emitted))
        if steps <= 0:
            return (
                [make_response(self, request, ft.assemble_outputs(token_request, results), final)]
                if final
                else []
            )
        responses = []
        for step in range(1, steps + 1):
            cut = [
                [_prefix(b, min(e + step, n)) for b in beams]
                for beams, e, n in zip(results, emitted, lengths)
            ]
            tensors = ft.assemble_outputs(token_request, cut)
            responses.append(make_response(self, request, tensors, final and step == steps))
        emitted[:] = lengths
        return responses

    def _texts(
        self, job: _Job, latest: list[RequestOutput | None], deltas: list[dict[int, str]] | None
    ) -> np.ndarray:
        width = max(p.n for p in job.params)
        out = np.empty((len(latest), width), dtype=object)
        assert job.prompt_texts is not None
        for b, row in enumerate(latest):
            for k in range(width):
                if deltas is not None:
                    text = deltas[b].get(k, "")
                else:
                    done = {c.index: c.text for c in row.outputs} if row else {}
                    prefix = "" if job.exclude_input else job.prompt_texts[b]
                    text = prefix + done.get(k, "")
                out[b, k] = text.encode("utf-8")
        return out


def _beams(out: RequestOutput | None, width: int) -> list[ft.BeamResult]:
    if out is None:
        return []
    beams = sorted(out.outputs, key=lambda c: c.index)[:width]
    return [
        ft.BeamResult(list(c.token_ids), float(c.cumulative_logprob), [lp.logprob for lp in c.logprobs or []])
        for c in beams
    ]


def _prefix(beam: ft.BeamResult, length: int) -> ft.BeamResult:
    """The beam as it stood after its first `length` generated tokens."""
    if length >= len(beam.token_ids):
        return beam
    log_probs = beam.log_probs[:length]
    return ft.BeamResult(beam.token_ids[:length], float(sum(log_probs)), log_probs)
