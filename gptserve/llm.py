"""`LLM`: offline batched generation, the Python face of the engine."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

from gptserve.engine.builder import build_engine
from gptserve.engine.engine_options import EngineOptions
from gptserve.engine.llm_engine import LLMEngine
from gptserve.engine.tp_launcher import shutdown_world
from gptserve.outputs import RequestOutput
from gptserve.progress import progress_bar
from gptserve.sampling_params import SamplingParams

Prompt = str | Sequence[int]


class LLM:
    """Load a model once and generate for many prompts with continuous batching.

    `LLM()` serves the embedded SmolLM2-135M-Instruct. Engine options mirror the serve flags in snake
    case (`device`, `dtype`, `max_model_len`, `max_num_seqs`, `max_num_batched_tokens`,
    `kv_cache_memory`, `block_size`, `enable_prefix_caching`, `tensor_parallel_size`,
    `generation_config`, ...).
    """

    def __init__(self, model: str | Path | None = None, **engine_options):
        self.engine = build_engine(model, EngineOptions(**engine_options))
        self._ids = itertools.count()

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> LLM:
        """Wrap an engine built elsewhere (`build_engine` with a checkpoint of its own)."""
        llm = cls.__new__(cls)
        llm.engine = engine
        llm._ids = itertools.count()
        return llm

    def close(self) -> None:
        """Stop this process's tensor-parallel workers, if any (also done at interpreter exit), and give
        the KV cache back; the LLM cannot generate afterwards."""
        shutdown_world()
        self.engine.runner.release()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """`SamplingParams` with the model's default sampling values (`generation_config`), which
        `generate` uses when given none; build on it with `dataclasses.replace`."""
        return SamplingParams(**self.engine.sampling_defaults.values())

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt; returns one finished `RequestOutput` per prompt, in order.

        A prompt is a string or a list of token ids; `sampling_params` is one for all or one per prompt.
        `use_tqdm` shows a progress bar over finished requests (see `gptserve.progress`). Without
        `sampling_params`, the model's defaults (`get_default_sampling_params`).
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or self.get_default_sampling_params()
        per_prompt = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"got {len(per_prompt)} sampling params for {len(prompts)} prompts")
        ids = []
        try:
            for prompt, p in zip(prompts, per_prompt):
                request_id = f"llm-{next(self._ids)}"
                self.engine.add_request(request_id, prompt, p)
                ids.append(request_id)
            results: dict[str, RequestOutput] = {}
            bar_options = {} if use_tqdm else {"disable": True}
            with progress_bar(len(ids), "generate", "req", **bar_options) as bar:
                while self.engine.has_unfinished_requests():
                    for out in self.engine.step():
                        if out.finished:
                            results[out.request_id] = out
                            bar.update(1)
        except BaseException:
            for request_id in ids:
                self.engine.forget_request(request_id)
            raise
        return [results[i] for i in ids]
