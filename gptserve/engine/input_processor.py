"""`InputProcessor`: the one place that decides whether a request may enter the engine.

It renders chat messages with the model's chat template, tokenizes text prompts and checks what the
engine core will trust without looking again: every token id inside the vocabulary, the prompt within
the model's context (and, where the caller asks for it, the prompt plus `max_tokens`), the sampling
values against the vocabulary, and a structured-output constraint, which it compiles (`GrammarCompiler`,
cached per constraint; `compile_grammar` lets a front-end compile off its event loop first). The
OpenAI routes, the Triton models and `LLM` all call it; its errors are `InvalidRequestError`s naming
the field at fault.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from gptserve.engine.chat_template import ChatTemplate
from gptserve.engine.core_io import EngineCoreRequest
from gptserve.engine.grammar import CompiledGrammar, GrammarCompiler
from gptserve.errors import InvalidRequestError
from gptserve.sampling_params import SamplingParams


class InputProcessor:
    """Tokenizes and validates requests for one model."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | None,
        vocab_size: int,
        max_model_len: int,
        chat_template: ChatTemplate | None = None,
        eos_token_ids: Iterable[int] = (),
    ):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        # None: no template (rendering refuses, naming `--chat-template`)
        self.chat_template = chat_template or ChatTemplate(None)
        self.grammars = None if tokenizer is None else GrammarCompiler(tokenizer, vocab_size, eos_token_ids)

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> str:
        """The prompt text of `messages` (plain dicts) under the model's chat template."""
        return self.chat_template.render(messages, add_generation_prompt, continue_final_message, extra)

    def tokenize(self, text: str, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer: send token ids instead of text", param)
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def compile_grammar(self, params: SamplingParams) -> CompiledGrammar | None:
        """The compiled structured-output constraint of `params` (None without one); an
        `InvalidRequestError` naming the field if it is invalid. Cached: a second call costs a lookup."""
        spec = params.structured_outputs
        if spec is None:
            return None
        if self.grammars is None:
            raise InvalidRequestError("structured output needs the model's tokenizer", spec.param)
        return self.grammars.compile(spec)

    def check_token_ids(self, token_ids: Sequence[int], param: str = "prompt") -> None:
        """Every id inside the vocabulary (the tokenizer cannot decode the others: an id below 0 or beyond
        64 bits makes it raise `OverflowError`)."""
        vocab = self.vocab_size
        for t in token_ids:
            if not 0 <= t < vocab:
                raise InvalidRequestError(
                    f"{param} holds token id {t} outside the vocabulary of {vocab}", param
                )

    def fit_to_context(
        self,
        params: SamplingParams,
        num_prompt_tokens: int,
        prompt_param: str = "prompt",
        max_tokens_param: str = "max_tokens",
    ) -> SamplingParams:
        """Prompt + max_tokens must fit the context; without max_tokens, fill what is left."""
        limit = self.max_model_len
        requested = params.max_tokens
        if requested is None:
            if num_prompt_tokens >= limit:
                raise InvalidRequestError(
                    f"This model's maximum context length is {limit} tokens (max_model_len), but the "
                    f"{prompt_param} has {num_prompt_tokens} tokens, leaving no room for a completion "
                    f"({max_tokens_param} was not set). Shorten the {prompt_param}.",
                    prompt_param,
                    "context_length_exceeded",
                )
            return dataclasses.replace(params, max_tokens=limit - num_prompt_tokens)
        if num_prompt_tokens + requested > limit:
            raise InvalidRequestError(
                f"This model's maximum context length is {limit} tokens (max_model_len), but "
                f"{num_prompt_tokens + requested} were requested: {num_prompt_tokens} in the {prompt_param} "
                f"and {requested} for the completion ({max_tokens_param}={requested}). Shorten the "
                f"{prompt_param} or lower {max_tokens_param}.",
                prompt_param,
                "context_length_exceeded",
            )
        return params

    def process(
        self,
        request_id: str,
        prompt: str | Sequence[int],
        params: SamplingParams,
        *,
        fit_max_tokens: bool = False,
        prompt_param: str = "prompt",
        max_tokens_param: str = "max_tokens",
        add_special_tokens: bool = True,
    ) -> EngineCoreRequest:
        """A request the core may admit as it is. With `fit_max_tokens` (the APIs), prompt + max_tokens
        must fit the context and a missing max_tokens takes what is left; without it (`LLM`), the prompt
        must leave room for one token and generation stops at the context's end."""
        if isinstance(prompt, str):
            token_ids = self.tokenize(prompt, add_special_tokens, prompt_param)
        else:
            token_ids = [int(t) for t in prompt]
            self.check_token_ids(token_ids, prompt_param)
        if not token_ids:
            raise InvalidRequestError(f"{prompt_param} is empty", prompt_param)
        if fit_max_tokens:
            params = self.fit_to_context(params, len(token_ids), prompt_param, max_tokens_param)
        elif len(token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"{prompt_param} has {len(token_ids)} tokens but the model's context is {self.max_model_len} "
                f"tokens (max_model_len), which must also leave room for at least one generated token",
                prompt_param,
                "context_length_exceeded",
            )
        params.check_vocab(self.vocab_size)
        grammar = self.compile_grammar(params)
        state = None if grammar is None else grammar.new_state()
        return EngineCoreRequest(request_id, token_ids, params, state)
