"""From an OpenAI request body to engine `SamplingParams`.

The structured-output constraint comes from `structured_request.py`. Range checks live in
`SamplingParams`; its errors name the engine's field, which `renames` maps back to the name the client
used (chat's `max_completion_tokens`, `top_logprobs`).
"""

from __future__ import annotations

from gptserve.errors import InvalidRequestError
from gptserve.generation_defaults import GenerationDefaults
from gptserve.sampling_params import SamplingParams
from gptserve.server.errors import bad_request, to_api_error
from gptserve.server.openai_protocol import SamplingFields
from gptserve.server.structured_request import structured_outputs


def _logit_bias(raw: dict[str, float] | None) -> dict[int, float] | None:
    if not raw:
        return None
    out = {}
    for key, value in raw.items():
        try:
            out[int(key)] = value
        except ValueError:
            raise bad_request(f"logit_bias keys must be token ids, got {key!r}", "logit_bias") from None
    return out


def build_sampling_params(
    req: SamplingFields,
    max_tokens: int | None,
    logprobs: int | None,
    renames: dict[str, str] | None = None,
    prompt_logprobs: int | None = None,
    defaults: GenerationDefaults | None = None,
) -> SamplingParams:
    """The request's sampling fields as `SamplingParams`; a 400 naming the field if one is out of range.
    A field the request leaves out takes the served model's default (`defaults`)."""
    pick = (defaults or GenerationDefaults()).pick
    try:
        return SamplingParams(
            n=req.n,
            max_tokens=max_tokens,
            temperature=pick("temperature", req.temperature),
            top_p=pick("top_p", req.top_p),
            top_k=pick("top_k", req.top_k),
            min_p=pick("min_p", req.min_p),
            seed=req.seed,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=pick("repetition_penalty", req.repetition_penalty),
            logit_bias=_logit_bias(req.logit_bias),
            stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []),
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos,
            min_tokens=req.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=req.skip_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output,
            structured_outputs=structured_outputs(req),
        )
    except InvalidRequestError as e:
        raise to_api_error(e, renames) from None
