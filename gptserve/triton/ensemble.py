"""`EnsembleModel`: runs a config's `ensemble_scheduling` steps as Triton does.

Each step names a model and maps the ensemble's tensors to its inputs (`input_map`: step input -> ensemble
tensor) and its outputs back (`output_map`: step output -> ensemble tensor). A step runs once every tensor
it reads is available; a tensor that no step produces and the client did not send (an optional input)
is simply not passed on. When a step answers several times (a decoupled or streaming model), the steps
after it run once per response and the ensemble answers each time, the last answer final. Errors of a
step reach the client as the step raised them.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from gptserve.triton.types import (
    InferRequest,
    InferResponse,
    TritonError,
    TritonModel,
    check_request,
    make_response,
    tensor_specs,
)

# Tensor name -> (data, datatype).
Tensors = dict[str, tuple[np.ndarray, str]]
Resolver = Callable[[str, str], TritonModel]  # (model name, version or "") -> a ready model


def check_ensemble(config: mc.ModelConfig) -> None:
    """Reject a schedule that can never complete: an output or step input nothing provides."""
    steps = config.ensemble_scheduling.step
    if not steps:
        raise TritonError(f"ensemble '{config.name}' has no ensemble_scheduling steps")
    available = {t.name for t in config.input} | {v for s in steps for v in s.output_map.values()}
    for step in steps:
        for value in step.input_map.values():
            if value not in available:
                raise TritonError(
                    f"ensemble '{config.name}': step '{step.model_name}' reads '{value}', which is neither "
                    f"an ensemble input nor a step output"
                )
    for output in config.output:
        if output.name not in available:
            raise TritonError(f"ensemble '{config.name}': no step produces output '{output.name}'")


class EnsembleModel(TritonModel):
    """A pipeline of other models of the repository, wired by `ensemble_scheduling`."""

    def __init__(self, name: str, version: str, config: mc.ModelConfig, resolve: Resolver):
        super().__init__()
        check_ensemble(config)
        self.name = name
        self.version = version
        self.config = config
        self.resolve = resolve
        self.inputs, self.outputs = tensor_specs(config)

    @staticmethod
    def step_names(config: mc.ModelConfig) -> list[str]:
        """The models an ensemble config runs, each once, in step order."""
        return list(dict.fromkeys(s.model_name for s in config.ensemble_scheduling.step))

    @property
    def step_models(self) -> list[str]:
        return self.step_names(self.config)

    @property
    def ready(self) -> bool:
        """Ready while every step model is (Triton marks an ensemble unavailable with its steps)."""
        return not self._unready_steps()

    @property
    def not_ready_reason(self) -> str:
        return f"step models not ready: {', '.join(self._unready_steps())}"

    def _unready_steps(self) -> list[str]:
        unready = []
        for name in self.step_models:
            try:
                if not self.resolve(name, "").ready:
                    unready.append(name)
            except TritonError:
                unready.append(name)
        return unready

    async def infer(self, request: InferRequest) -> InferResponse:
        last = None
        async with contextlib.aclosing(self._execute(request, streaming=False)) as responses:
            async for response in responses:
                last = response
        assert last is not None
        return last

    async def stream(self, request: InferRequest) -> AsyncIterator[InferResponse]:
        async with contextlib.aclosing(self._execute(request, streaming=True)) as responses:
            async for response in responses:
                yield response

    async def _execute(self, request: InferRequest, streaming: bool) -> AsyncIterator[InferResponse]:
        start = self.stats.begin()
        ok = False
        rows = next((1 if a.ndim == 0 else a.shape[0] for a in request.inputs.values()), 0)
        try:
            check_request(self, request, shapes=False)
            tensors: Tensors = {
                name: (data, request.datatypes.get(name) or self._input_type(name))
                for name, data in request.inputs.items()
            }
            steps = list(self.config.ensemble_scheduling.step)
            async with contextlib.aclosing(self._walk(request, tensors, steps, streaming, True)) as walk:
                async for result, final in walk:
                    yield make_response(self, request, {k: v[0] for k, v in result.items()}, final)
            ok = True
        finally:
            self.stats.record(start, rows, ok)

    def _input_type(self, name: str) -> str:
        return next(s.datatype for s in self.inputs if s.name == name)

    async def _walk(
        self,
        request: InferRequest,
        tensors: Tensors,
        pending: list[mc.ModelEnsembling.Step],
        streaming: bool,
        final: bool,
    ) -> AsyncIterator[tuple[Tensors, bool]]:
        if not pending:
            yield tensors, final
            return
        index = self._next_step(tensors, pending)
        step, rest = pending[index], pending[:index] + pending[index + 1 :]
        version = str(step.model_version) if step.model_version > 0 else ""
        model = self.resolve(step.model_name, version)
        sub = InferRequest(
            model_name=step.model_name,
            model_version=version,
            id=request.id,
            parameters=dict(request.parameters),
            inputs={k: tensors[v][0] for k, v in step.input_map.items() if v in tensors},
            datatypes={k: tensors[v][1] for k, v in step.input_map.items() if v in tensors},
            outputs=list(step.output_map.keys()),
        )
        if not streaming:
            response = await self._call(step, model.infer(sub))
            async with contextlib.aclosing(
                self._walk(request, self._merge(tensors, step, response), rest, False, final)
            ) as walk:
                async for item in walk:
                    yield item
            return
        async with contextlib.aclosing(model.stream(sub)) as responses:
            while True:
                try:
                    response = await self._call(step, responses.__anext__())
                except StopAsyncIteration:
                    return
                merged = self._merge(tensors, step, response)
                async with contextlib.aclosing(
                    self._walk(request, merged, rest, True, final and response.final)
                ) as walk:
                    async for item in walk:
                        yield item

    @staticmethod
    async def _call(step: mc.ModelEnsembling.Step, awaitable):  # -> InferResponse
        try:
            return await awaitable
        except (TritonError, StopAsyncIteration):
            raise
        except Exception as e:
            raise TritonError(
                f"ensemble step '{step.model_name}' failed: {type(e).__name__}: {e}", 500
            ) from e

    @staticmethod
    def _next_step(tensors: Tensors, pending: list[mc.ModelEnsembling.Step]) -> int:
        for i, step in enumerate(pending):
            produced_later = {v for j, s in enumerate(pending) if j != i for v in s.output_map.values()}
            if all(v in tensors or v not in produced_later for v in step.input_map.values()):
                return i
        names = ", ".join(s.model_name for s in pending)
        raise TritonError(f"ensemble steps {names} wait on each other's outputs", 500)

    @staticmethod
    def _merge(tensors: Tensors, step: mc.ModelEnsembling.Step, response: InferResponse) -> Tensors:
        merged = dict(tensors)
        for out in response.outputs:
            target = step.output_map.get(out.name)
            if target:
                merged[target] = (out.data, out.datatype)
        return merged
