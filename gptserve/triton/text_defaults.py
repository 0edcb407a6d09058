"""The served model's default sampling values for the text form (`text_input`) of the Triton model.

A scalar the request sends (as an input tensor or a request parameter) wins; one it leaves out takes the
model's default. With only gptserve's own defaults (no `generation_config.json`, no card values), the
text form keeps FasterTransformer's meaning: no `runtime_top_k`/`runtime_top_p` is greedy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from gptserve.generation_defaults import GenerationDefaults
from gptserve.sampling_params import SamplingParams

# Triton input name of each default the text form takes from the model (min_p has no FT input).
TEXT_INPUTS = {
    "temperature": "temperature",
    "top_p": "runtime_top_p",
    "top_k": "runtime_top_k",
    "repetition_penalty": "repetition_penalty",
}


def with_model_defaults(
    defaults: GenerationDefaults, inputs: Mapping[str, np.ndarray], extra: Mapping[str, Any]
) -> dict[str, Any]:
    """`extra` (the request parameters) with the model's default for each scalar the request left out."""
    if defaults.is_builtin:
        return dict(extra)
    filled = dict(extra)
    for field, name in TEXT_INPUTS.items():
        if name not in inputs and name not in extra:
            filled[name] = getattr(defaults, field)
    if defaults.temperature == 0.0 and "runtime_top_k" not in inputs and "runtime_top_k" not in extra:
        filled["runtime_top_k"] = 1  # greedy however FT reads the other scalars
    return filled


def with_model_min_p(
    defaults: GenerationDefaults, params: list[SamplingParams], extra: Mapping[str, Any]
) -> list[SamplingParams]:
    """min_p from the request parameters, else the model's default."""
    min_p = extra.get("min_p", None if defaults.is_builtin else defaults.min_p)
    if min_p is None:
        return params
    return [dataclasses.replace(p, min_p=float(min_p)) for p in params]
