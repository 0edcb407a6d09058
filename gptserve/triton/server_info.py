"""What both Triton front-ends (HTTP `/v2`, gRPC `ServerMetadata` and friends) report about the server
and look up in its model registry: name, version, extensions, readiness, the model version that serves
a request, and the ready versions of a model.

`registry` is anything with the `ModelRegistry` surface the front-ends read (`ready`, `get`, `models`,
`index`).
"""

from __future__ import annotations

from typing import Any

from gptserve import __version__
from gptserve.triton.types import TritonError, TritonModel

SERVER_NAME = "gptserve"
SERVER_VERSION = __version__
# The Triton extensions this server implements, reported alike over HTTP and gRPC (as Triton reports
# one server-wide list); `binary_tensor_data` and `generate` are extensions of the HTTP protocol.
SERVER_EXTENSIONS: tuple[str, ...] = (
    "binary_tensor_data",
    "parameters",
    "model_configuration",
    "statistics",
    "model_repository",
    "model_repository(unload_dependents)",
    "generate",
)


def server_ready(registry: Any) -> bool:
    """Triton's strict readiness: the registry started and every model it serves is ready."""
    return bool(registry.ready) and all(m.ready for m in registry.models())


def serving_model(registry: Any, name: str, version: str = "") -> TritonModel:
    """The model version that serves an inference request ("" = the latest ready one): 404 when
    unknown, 503 when it is not ready."""
    model = registry.get(name, version)
    if not model.ready:
        raise TritonError(f"model '{name}' version {model.version} is not ready", 503)
    return model


def ready_versions(registry: Any, model: TritonModel) -> list[str]:
    """The ready versions of `model`'s name, in the registry's index order; its own when none is listed."""
    versions = [
        str(entry["version"])
        for entry in registry.index(ready_only=True)
        if entry.get("name") == model.name and entry.get("version") not in (None, "")
    ]
    return versions or [str(model.version)]
