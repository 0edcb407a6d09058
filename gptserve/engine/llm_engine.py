"""`LLMEngine`: a loaded model as the front-ends see it: input processor -> engine core -> output processor.

The builder returns one. `LLM` drives it synchronously (`add_request`, `step`); the servers hand its core
to an `AsyncEngine`, which runs the core on its own thread and the processors on the event loop. The
tokenizer, the model's name and chat template, the end-of-sequence ids and the context length live here,
so every front-end reads them from one place.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from gptserve.config import EngineConfig
from gptserve.engine.engine_core import EngineCore
from gptserve.engine.input_processor import InputProcessor
from gptserve.engine.model_runner import ModelRunner
from gptserve.engine.output_processor import OutputProcessor
from gptserve.errors import InvalidRequestError
from gptserve.generation_defaults import GenerationDefaults
from gptserve.outputs import RequestOutput
from gptserve.sampling_params import SamplingParams


class LLMEngine:
    """One model, its engine core and the processors in front of and behind it."""

    # The model's default sampling values for fields a request leaves out (the builder sets them).
    sampling_defaults: GenerationDefaults = GenerationDefaults()

    def __init__(
        self,
        config: EngineConfig,
        runner: ModelRunner,
        tokenizer: PreTrainedTokenizerBase | None,
        model_name: str = "model",
        chat_template: str | None = None,
    ):
        self.config = config
        self.model_config = config.model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.chat_template = chat_template
        self.max_model_len = config.scheduler.max_model_len
        eos = set(config.model.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.core = EngineCore(config, runner, self.eos_token_ids)
        self.input_processor = InputProcessor(
            tokenizer, config.model.vocab_size, self.max_model_len, eos_token_ids=self.eos_token_ids
        )
        self.output_processor = OutputProcessor(tokenizer, self.eos_token_ids)

    @property
    def runner(self) -> ModelRunner:
        return self.core.runner

    @property
    def num_generated_tokens(self) -> int:
        return self.core.num_generated_tokens

    def add_request(self, request_id: str, prompt: str | Sequence[int], params: SamplingParams) -> None:
        """Validate and queue a request; raises `InvalidRequestError` naming the problem."""
        if request_id in self.core.requests or request_id in self.output_processor:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        request = self.input_processor.process(request_id, prompt, params)
        text = prompt if isinstance(prompt, str) else None
        self.output_processor.add_request(request_id, request.prompt_token_ids, request.params, text)
        self.core.add_request(request)

    def abort_request(self, request_id: str) -> None:
        """Stop a request now; its blocks are freed at once and the next `step()` reports it ended
        with "abort"."""
        self.core.abort_request(request_id)

    def forget_request(self, request_id: str) -> None:
        """Abort a request whose outputs nobody will read (the caller gave up on the whole batch)."""
        self.core.abort_request(request_id)
        self.output_processor.drop(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        """Run one core iteration; returns, with their text, the requests that progressed or ended. A stop
        string ends its sequence in the core here, before the next step."""
        results = []
        for out in self.core.step():
            processed, stopped = self.output_processor.process(out)
            if processed is None:
                continue
            for c in processed.outputs:
                if c.index in stopped:
                    self.core.finish_sequence(out.request_id, c.index, c.stop_reason)
            results.append(processed)
        return results
