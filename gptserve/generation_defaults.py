"""`GenerationDefaults`: the sampling values a model recommends, used for the fields a request leaves out.

They come from the model's `generation_config.json` (as vLLM's `--generation-config auto` reads it:
temperature, top_p, top_k, min_p, repetition_penalty), else from what is known of the model (the
embedded SmolLM2's card), else gptserve's own defaults below. A value the request sets always wins.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# The generation_config.json keys that become request defaults (vLLM applies the same ones).
GENERATION_CONFIG_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")

BUILTIN_SOURCE = "gptserve defaults"


@dataclass(frozen=True)
class GenerationDefaults:
    """Default sampling values of one served model and where they came from (`source`). The field
    defaults are gptserve's own, for a model that recommends nothing: the OpenAI API's plain sampling."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    source: str = BUILTIN_SOURCE

    @classmethod
    def from_generation_config(cls, config: dict[str, Any], source: str) -> GenerationDefaults:
        """The recognised keys of a `generation_config.json`; the rest keep gptserve's defaults. A config
        with `do_sample: false` asks for greedy decoding, as transformers reads it; one with neither (only
        token ids, as transformers writes beside every model) recommends nothing: gptserve's own."""
        values = {k: config[k] for k in GENERATION_CONFIG_KEYS if config.get(k) is not None}
        if config.get("do_sample") is False:
            values["temperature"] = 0.0
        if not values:  # e.g. the file transformers writes beside every model: it recommends nothing
            return cls()
        if "top_k" in values:
            values["top_k"] = int(values["top_k"])
        for key in ("temperature", "top_p", "min_p", "repetition_penalty"):
            if key in values:
                values[key] = float(values[key])
        return cls(**values, source=source)

    @property
    def is_builtin(self) -> bool:
        """True when the model recommended nothing and these are gptserve's own defaults."""
        return self.source == BUILTIN_SOURCE

    def values(self) -> dict[str, float | int]:
        """The sampling fields alone, as a request would name them."""
        return {k: getattr(self, k) for k in GENERATION_CONFIG_KEYS}

    def pick(self, name: str, value: Any) -> Any:
        """`value` when the request set it, else this model's default for field `name`."""
        return getattr(self, name) if value is None else value

    def describe(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in self.values().items())
        return f"{fields} (from {self.source})"

    def replace(self, **changes: Any) -> GenerationDefaults:
        return dataclasses.replace(self, **changes)
