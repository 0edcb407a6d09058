"""Request bodies of the OpenAI-compatible routes, as pydantic models.

Types are strict (a string is not a number, a float is not an integer) and unknown fields are refused,
so a misspelt parameter is a 400 rather than silently ignored. Ranges are checked by `SamplingParams`,
which names the field at fault; these models only fix the shapes, and state the ranges in their JSON
schema (`ranged`: documentation only, no validation) so that the OpenAPI document tells clients and
fuzzers what is accepted. vLLM's extra sampling fields are accepted in the body (the SDK sends them
through `extra_body`), and so are the OpenAI fields this server has no use for (`IgnoredFields`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gptserve.sampling_params import MAX_LOGIT_BIAS_ENTRIES, MAX_LOGPROBS, MAX_N, MAX_STOP_STRINGS


def ranged(default: Any, **schema: Any) -> Any:
    """A field with `default` whose JSON schema also carries `schema` (e.g. `minimum`); not validated
    here, since `SamplingParams` does it with a message that names the field."""
    return Field(default, json_schema_extra=schema)


TOKEN_IDS = {"items": {"type": "integer", "minimum": 0}}
PROMPT = {  # text, texts, token ids or lists of token ids; none of them empty
    "anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
        {"type": "array", "minItems": 1, **TOKEN_IDS},
        {"type": "array", "minItems": 1, "items": {"type": "array", "minItems": 1, **TOKEN_IDS}},
    ]
}
LOGPROBS = {"minimum": 0, "maximum": MAX_LOGPROBS}


class OpenAIModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(OpenAIModel):
    include_usage: bool = False  # one last chunk with the request's usage
    continuous_usage_stats: bool = False  # vLLM's: the usage so far in every chunk


class JsonSchemaFormat(OpenAIModel):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # the schema is always enforced


class ResponseFormat(OpenAIModel):
    """OpenAI's `response_format`: free text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsField(OpenAIModel):
    """vLLM's `structured_outputs`: exactly one of json, regex, choice, grammar or json_object."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    whitespace_pattern: str | None = None
    disable_any_whitespace: bool = False  # compact JSON


class StructuredFields(OpenAIModel):
    """Ways to constrain the output (at most one per request); see `structured_request.py`."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsField | None = None
    # vLLM's older names for the same
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None


class IgnoredFields(OpenAIModel):
    """OpenAI fields that are accepted and ignored, so that clients which always send them work: this
    server stores no completions (`store`, `metadata`), keeps no per-user accounting (`user`) and has one
    service tier (`service_tier`). Their types are still checked. Every other unknown field is a 400."""

    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    service_tier: str | None = None


# Accepted and ignored on `/v1/completions` and `/v1/chat/completions`.
IGNORED_FIELDS = tuple(IgnoredFields.model_fields)


class SamplingFields(StructuredFields):
    """The sampling fields shared by completions and chat completions."""

    model: str | None = None
    n: int = ranged(1, minimum=1, maximum=MAX_N)
    temperature: float | None = ranged(None, minimum=0, maximum=100)
    top_p: float | None = ranged(None, exclusiveMinimum=0, maximum=1)
    seed: int | None = ranged(None, minimum=0, exclusiveMaximum=2**64)
    stop: str | list[str] | None = ranged(
        None, minLength=1, maxItems=MAX_STOP_STRINGS, items={"type": "string", "minLength": 1}
    )
    presence_penalty: float = ranged(0.0, minimum=-2, maximum=2)
    frequency_penalty: float = ranged(0.0, minimum=-2, maximum=2)
    logit_bias: dict[str, float] | None = ranged(
        None,
        maxProperties=MAX_LOGIT_BIAS_ENTRIES,
        additionalProperties={"type": "number", "minimum": -100, "maximum": 100},
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extras
    top_k: int | None = ranged(None, minimum=-1)
    min_p: float | None = ranged(None, minimum=0, maximum=1)
    repetition_penalty: float | None = ranged(None, exclusiveMinimum=0, maximum=10)
    ignore_eos: bool = False
    min_tokens: int = ranged(0, minimum=0)
    stop_token_ids: list[int] | None = ranged(None, **TOKEN_IDS)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = ranged(None, **LOGPROBS)


class CompletionRequest(SamplingFields, IgnoredFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(json_schema_extra=PROMPT)
    max_tokens: int | None = ranged(16, minimum=0)  # 0 with echo: score the prompt, generate nothing
    logprobs: int | None = ranged(None, **LOGPROBS)
    echo: bool = False
    best_of: int | None = ranged(None, minimum=1, maximum=MAX_N)
    suffix: str | None = None
    add_special_tokens: bool = True


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: str


class FunctionDefinition(OpenAIModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None = no arguments
    strict: bool | None = None  # arguments always follow the schema when the call is constrained


class Tool(OpenAIModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    type: Literal["function"]
    function: FunctionName


Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class ChatMessage(BaseModel):
    """One message; fields beyond role/content/name (tool calls, ids) are handed to the template."""

    model_config = ConfigDict(strict=True, extra="allow")

    role: Role
    content: str | list[TextPart | dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields, IgnoredFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = ranged(None, minimum=1)
    max_completion_tokens: int | None = ranged(None, minimum=1)
    logprobs: bool = False
    top_logprobs: int | None = ranged(None, **LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # vLLM's extras
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeCompletionRequest(OpenAIModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(OpenAIModel):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = None  # rendered as a chat completion with these tools would be


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[int] = Field(json_schema_extra=TOKEN_IDS)
