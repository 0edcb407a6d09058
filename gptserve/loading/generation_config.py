"""Where a model's default sampling values are read from (`--generation-config auto|none|PATH`).

`auto`: `generation_config.json` in the model directory (an HF directory or one `gptserve convert`
wrote), or beside a GGUF file; else, for the embedded SmolLM2-135M-Instruct, the values its model card
samples with; else gptserve's own defaults. `none`: gptserve's own defaults. A PATH: the
`generation_config.json` in that directory (or that file).
"""

from __future__ import annotations

import json
from pathlib import Path

from gptserve.errors import GptServeError, InvalidRequestError
from gptserve.generation_defaults import GenerationDefaults
from gptserve.loading.default_model import default_model_path
from gptserve.sampling_params import SamplingParams

GENERATION_CONFIG_FILE = "generation_config.json"

# SmolLM2-135M-Instruct's model card samples with temperature 0.2 and top_p 0.9.
SMOLLM2_CARD_DEFAULTS = GenerationDefaults(
    temperature=0.2, top_p=0.9, source="the SmolLM2-135M-Instruct model card"
)


def read_generation_defaults(model: str | Path | None, generation_config: str = "auto") -> GenerationDefaults:
    """The default sampling values for `model` (None: the embedded default) under `generation_config`."""
    if generation_config == "none":
        return GenerationDefaults()
    if generation_config != "auto":
        path = Path(generation_config).expanduser()
        file = path / GENERATION_CONFIG_FILE if path.is_dir() else path
        if not file.is_file():
            raise GptServeError(f"--generation-config {generation_config}: no {GENERATION_CONFIG_FILE} there")
        return _read(file)
    path = default_model_path() if model is None else Path(model).expanduser()
    file = (path if path.is_dir() else path.parent) / GENERATION_CONFIG_FILE
    if file.is_file():
        return _read(file)
    if model is None:
        return SMOLLM2_CARD_DEFAULTS
    return GenerationDefaults()


def _read(file: Path) -> GenerationDefaults:
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise GptServeError(f"cannot read {file}: {e}") from None
    if not isinstance(config, dict):
        raise GptServeError(f"{file} does not hold a JSON object")
    try:
        defaults = GenerationDefaults.from_generation_config(config, str(file))
        SamplingParams(**defaults.values())  # refused here rather than in every request that leans on it
    except (InvalidRequestError, TypeError, ValueError) as e:
        raise GptServeError(f"{file}: {e}") from None
    return defaults
