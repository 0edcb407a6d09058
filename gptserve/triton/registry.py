"""`ModelRegistry`: every model the Triton front-ends serve, with its versions and their states.

It reads the `--model-repository` directories at start-up (`load_all`) or, in explicit model control
mode, on `load` requests; builds each model version (FasterTransformer configs become `LLMModel`s over
their own engine, ensembles `EnsembleModel`s, FT's preprocessing/postprocessing python models the
native `tokenizer_models`) and registers the model served without a repository (`add_llm`). A model
that fails to load is listed UNAVAILABLE with its reason; the others are served regardless. The
registry starts and stops the engines it built; the engine given to `add_llm` belongs to the caller.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from gptserve.engine.builder import build_engine
from gptserve.engine.engine_options import EngineOptions
from gptserve.errors import GptServeError
from gptserve.frontend.async_engine import AsyncEngine
from gptserve.triton import repository as repo
from gptserve.triton.ensemble import EnsembleModel
from gptserve.triton.llm_model import LLMModel
from gptserve.triton.tokenizer_models import (
    PostprocessingModel,
    PreprocessingModel,
    load_gpt2_bpe,
    tokenizer_role,
)
from gptserve.triton.types import TritonError, TritonModel, not_found

logger = logging.getLogger(__name__)

READY, UNAVAILABLE, LOADING, UNLOADING = "READY", "UNAVAILABLE", "LOADING", "UNLOADING"
# Refused with 503 (gRPC UNAVAILABLE), the status Triton gives load/unload outside explicit mode.
EXPLICIT_ONLY = (
    "model control mode is 'none': models are loaded at start-up only; start the server with "
    "--model-control-mode explicit to load and unload models at run time"
)


@dataclass
class _Version:
    state: str
    reason: str = ""
    model: TritonModel | None = None


@dataclass
class _Entry:
    """One model name: where it lives and its versions ({} until loaded)."""

    name: str
    directory: Path | None
    versions: dict[str, _Version] = field(default_factory=dict)
    state: str = ""  # model-level state when no version is known (a config that did not parse)
    reason: str = ""


def _kind(config: mc.ModelConfig) -> int:
    """Load order: engines first (tokenizer models may borrow their tokenizer), ensembles last."""
    if config.platform == "ensemble":
        return 2
    return 0 if config.backend == "fastertransformer" else 1


class ModelRegistry:
    """The models of the Triton front-ends (HTTP and gRPC share one registry)."""

    def __init__(self, repositories: list[Path], engine_options: EngineOptions, explicit: bool = False):
        self.repositories = [Path(r) for r in repositories]
        self.engine_options = engine_options
        self._engines_to_build = 0  # LLM engines `load_all` has still to build (GPU memory shares)
        self.explicit = explicit
        self._entries: dict[str, _Entry] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._started = False

    # ------------------------------------------------------------------------------------- loading
    def load_all(self, engines_after: int = 0) -> None:
        """Scan the repositories; outside explicit mode, build every model (slow: loads checkpoints).
        `engines_after`: engines the caller builds afterwards, which need their share of the GPU too."""
        found = repo.model_directories(self.repositories)
        for name, directories in found.items():
            entry = self._entries.setdefault(name, _Entry(name, directories[0]))
            if len(directories) > 1:
                entry.state, entry.reason = (
                    UNAVAILABLE,
                    (
                        f"model '{name}' appears in more than one repository: "
                        + ", ".join(str(d.parent) for d in directories)
                    ),
                )
        if self.explicit:
            return
        loadable: list[tuple[_Entry, mc.ModelConfig, list[int]]] = []
        for entry in self._entries.values():
            if entry.directory is None or entry.state == UNAVAILABLE:
                continue
            try:
                config = repo.read_config(entry.directory, entry.name)
                loadable.append((entry, config, repo.select_versions(config, entry.directory)))
            except GptServeError as e:
                entry.state, entry.reason = UNAVAILABLE, str(e)
                logger.error("model '%s' is unavailable: %s", entry.name, e)
        # Each LLM's KV cache takes an equal part of the GPU memory left when it is built.
        self._engines_to_build = engines_after + sum(
            len(versions) for _, config, versions in loadable if _kind(config) == 0
        )
        for entry, config, versions in sorted(loadable, key=lambda item: _kind(item[1])):
            for version in versions:
                entry.versions[str(version)] = self._build_version(entry, config, version)

    def _build_version(self, entry: _Entry, config: mc.ModelConfig, version: int) -> _Version:
        try:
            model = self._build(entry, config, version)
        except Exception as e:  # a broken model is reported, the others still load
            message = e.message if isinstance(e, TritonError) else f"{e}" or type(e).__name__
            logger.error("model '%s' version %d is unavailable: %s", entry.name, version, message)
            return _Version(UNAVAILABLE, message)
        logger.info("model '%s' version %d is ready (%s)", entry.name, version, model.platform)
        return _Version(READY, model=model)

    def _build(self, entry: _Entry, config: mc.ModelConfig, version: int) -> TritonModel:
        assert entry.directory is not None
        name = entry.name
        if config.platform == "ensemble":
            missing = [m for m in EnsembleModel.step_names(config) if m not in self._entries]
            if missing:
                raise repo.ModelRepositoryError(
                    f"ensemble '{name}' uses models not in the repository: {missing}"
                )
            unready = [m for m in EnsembleModel.step_names(config) if not self._serves(m)]
            if unready:  # Triton does not load an ensemble whose steps failed to load
                reasons = "; ".join(f"'{m}': {self._unready_reason(m)}" for m in unready)
                raise repo.ModelRepositoryError(
                    f"ensemble '{name}' uses models that are not ready: {reasons}"
                )
            return EnsembleModel(name, str(version), config, self.get)
        if config.backend == "fastertransformer":
            path = repo.checkpoint_path(config, entry.directory, version)
            options = repo.ft_engine_options(config, self.engine_options)
            share = 1.0 / max(self._engines_to_build, 1)
            self._engines_to_build -= 1
            engine = build_engine(path, replace(options, gpu_memory_share=share))
            repo.check_model_type(config, engine.model_config.architecture)
            return LLMModel(name, str(version), config, AsyncEngine(engine))
        role = tokenizer_role(config) if config.backend == "python" else None
        if role is not None:
            tokenizer = load_gpt2_bpe(entry.directory / str(version)) or self._llm_tokenizer()
            if tokenizer is None:
                raise repo.ModelRepositoryError(
                    f"model '{name}' needs a tokenizer: put gpt2-vocab.json and gpt2-merges.txt in "
                    f"{entry.directory / str(version)}, or serve an LLM that has one"
                )
            cls = PreprocessingModel if role == "preprocessing" else PostprocessingModel
            return cls(name, str(version), config, tokenizer)
        raise repo.ModelRepositoryError(
            f"model '{name}': platform/backend '{config.platform or config.backend}' is not served; gptserve "
            "serves fastertransformer models, ensembles and FasterTransformer's preprocessing/postprocessing "
            "python models"
        )

    def _llm_tokenizer(self):  # -> PreTrainedTokenizerBase | None
        for model in self.models():
            if isinstance(model, LLMModel) and model.engine.engine.tokenizer is not None:
                return model.engine.engine.tokenizer
        return None

    def add_llm(self, name: str, async_engine: AsyncEngine) -> LLMModel:
        """Register the model served without a repository, as version "1"."""
        if name in self._entries:
            raise TritonError(f"model '{name}' is already in the model repository", 409)
        model = LLMModel.served(name, async_engine)
        self._entries[name] = _Entry(name, None, {"1": _Version(READY, model=model)})
        return model

    def _serves(self, name: str) -> bool:
        try:
            return self.get(name).ready
        except TritonError:
            return False

    def _unready_reason(self, name: str) -> str:
        entry = self._entries[name]
        reasons = [v.reason for v in entry.versions.values() if v.reason] + [entry.reason]
        return next((r for r in reasons if r), "not loaded")

    def failed(self) -> list[dict]:
        """The index rows of every model version that should serve and does not (start-up failures)."""
        return [row for row in self.index() if row["state"] != READY and row["reason"] != "unloaded"]

    # ------------------------------------------------------------------------------------- lookups
    def get(self, name: str, version: str = "") -> TritonModel:
        """The model version to serve ("" = the latest ready one). 404 if unknown, 503 if not ready."""
        entry = self._entries.get(name)
        if entry is None or not entry.versions:
            if entry is not None and entry.state == UNAVAILABLE:
                raise TritonError(f"Request for unknown model: '{name}' has no available versions", 503)
            raise not_found(name, version)
        if version:
            found = entry.versions.get(str(version))
            if found is None:
                raise not_found(name, version)
            if found.state != READY or found.model is None:
                raise TritonError(
                    f"Request for unknown model: '{name}' version {version} is not at ready state", 503
                )
            return found.model
        for key in sorted(entry.versions, key=int, reverse=True):
            found = entry.versions[key]
            if found.state == READY and found.model is not None:
                return found.model
        if all(v.reason == "unloaded" for v in entry.versions.values()):
            raise not_found(name)
        raise TritonError(f"Request for unknown model: '{name}' has no available versions", 503)

    def index(self, ready_only: bool = False) -> list[dict]:
        rows = []
        for name in sorted(self._entries):
            entry = self._entries[name]
            if not entry.versions:
                rows.append({"name": name, "version": "", "state": entry.state, "reason": entry.reason})
            for key in sorted(entry.versions, key=int):
                v = entry.versions[key]
                state, reason = v.state, v.reason
                if state == READY and v.model is not None and not v.model.ready:
                    state, reason = UNAVAILABLE, v.model.not_ready_reason
                rows.append({"name": name, "version": key, "state": state, "reason": reason})
        return [r for r in rows if r["state"] == READY] if ready_only else rows

    def models(self) -> list[TritonModel]:
        """Every ready model version."""
        return [
            v.model
            for e in self._entries.values()
            for v in e.versions.values()
            if v.state == READY and v.model is not None
        ]

    @property
    def ready(self) -> bool:
        """Started, and every model version that should serve is ready (Triton's strict readiness)."""
        return self._started and all(
            v.state == READY and v.model is not None and v.model.ready
            for e in self._entries.values()
            for v in e.versions.values()
            if v.reason != "unloaded"
        )

    def llm_engines(self) -> list[tuple[str, AsyncEngine]]:
        return [(m.name, m.engine) for m in self.models() if isinstance(m, LLMModel)]

    # ------------------------------------------------------------------------------------ lifetime
    async def start(self) -> None:
        """Start the engines of the loaded models on the running event loop."""
        self._started = True
        for model in self.models():
            await model.start()

    async def stop(self) -> None:
        self._started = False
        for model in self.models():
            await model.stop()

    # --------------------------------------------------------------------- explicit model control
    async def load(
        self, name: str, config_json: str | None = None, files: dict[str, bytes] | None = None
    ) -> None:
        """Load (or reload) a model of the repositories; `config_json` overrides its config and `files`
        (`file:<version>/<name>` -> content) its directory. Explicit model control mode only."""
        if not self.explicit:
            raise TritonError(EXPLICIT_ONLY, 503)
        async with self._lock(name):
            await self._load(name, config_json, files)

    async def _load(self, name: str, config_json: str | None, files: dict[str, bytes] | None) -> None:
        try:
            repo.check_model_name(name)
            directory = self._directory(name, config_json, files)
            config = repo.read_config(directory, name, config_json)
            versions = repo.select_versions(config, directory)
        except GptServeError as e:
            raise TritonError(f"failed to load '{name}': {e}") from e
        if config.platform == "ensemble":
            for step in EnsembleModel.step_names(config):
                if step != name and step not in self._ready_names():
                    await self.load(step)
        entry = self._entries.get(name)
        if entry is None or entry.directory != directory:
            entry = _Entry(name, directory, dict(entry.versions) if entry else {})
            self._entries[name] = entry
        previous = [v.model for v in entry.versions.values() if v.model is not None]
        for version in versions:
            current = entry.versions.get(str(version))
            if current is None or current.state != READY:
                entry.versions[str(version)] = _Version(LOADING)
        built = {str(v): await asyncio.to_thread(self._build_version, entry, config, v) for v in versions}
        if self._started:
            for new in built.values():
                if new.model is not None:
                    await new.model.start()
        entry.state, entry.reason = "", ""
        entry.versions = {**{k: _Version(UNAVAILABLE, "unloaded") for k in entry.versions}, **built}
        for model in previous:
            await model.stop()
        failed = [f"version {k}: {v.reason}" for k, v in built.items() if v.state != READY]
        if failed:
            raise TritonError(f"failed to load '{name}': " + "; ".join(failed))

    def _directory(self, name: str, config_json: str | None, files: dict[str, bytes] | None) -> Path:
        if files:
            if config_json is None:
                raise repo.ModelRepositoryError("file overrides need the 'config' parameter as well")
            return repo.write_override_files(Path(tempfile.mkdtemp(prefix="gptserve-model-")), name, files)
        for repository in self.repositories:
            candidate = repository / name
            if candidate.is_dir():
                return candidate
        raise repo.ModelRepositoryError(f"no model directory '{name}' in the model repositories")

    async def unload(self, name: str, unload_dependents: bool = False) -> None:
        """Unload every version of a model; `unload_dependents` also unloads an ensemble's step models."""
        if not self.explicit:
            raise TritonError(EXPLICIT_ONLY, 503)
        try:
            repo.check_model_name(name)
        except GptServeError as e:
            raise TritonError(f"failed to unload '{name}': {e}") from e
        entry = self._entries.get(name)
        if entry is None:
            raise not_found(name)
        async with self._lock(name):
            steps: list[str] = []
            for version in entry.versions.values():
                model = version.model
                if model is None:
                    continue
                if isinstance(model, EnsembleModel):
                    steps.extend(model.step_models)
                version.state = UNLOADING
                await model.stop()
                version.state, version.reason, version.model = UNAVAILABLE, "unloaded", None
        if unload_dependents:
            for step in dict.fromkeys(steps):
                if step != name and step in self._entries:
                    await self.unload(step, unload_dependents=True)

    def _ready_names(self) -> set[str]:
        return {m.name for m in self.models()}

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())
