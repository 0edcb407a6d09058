"""Triton model repositories on disk: model directories, `config.pbtxt`, version directories, FT parameters.

`config.pbtxt` is protobuf text of Triton's `ModelConfig` and is parsed as such (the `model_config_pb2`
module shipped in `tritonclient`). Version directories have numeric names not starting with "0";
`version_policy` picks among them (latest 1 by default). For the FasterTransformer backend this module
turns the config's parameters into what `build_engine` takes: the checkpoint path and engine options.

`data_type`: the server's `--dtype`, when given, wins over the config (and the difference is logged);
with `--dtype auto` the config's fp32/bf16/fp16 is used, except fp16 on CPU, where half-precision
matmuls are slow or missing, which runs in the engine's automatic CPU dtype instead (logged).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as mc

from gptserve.engine.engine_options import EngineOptions, resolve_device
from gptserve.errors import GptServeError

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.pbtxt"
FT_DATA_TYPES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}
# FasterTransformer `model_type` -> the architecture of `gptserve.config.ARCHITECTURES`.
FT_MODEL_TYPES = {"gpt-j": "gptj", "gptj": "gptj", "gpt-neox": "gpt_neox", "gpt": "gpt2", "llama": "llama"}


class ModelRepositoryError(GptServeError):
    """A model of a repository cannot be loaded; the message says which file or parameter and why."""


def check_model_name(name: str) -> None:
    """A model name is one directory name inside a repository, never a path out of it."""
    if not name or name in (".", "..") or any(c in name for c in "/\\\0") or name.startswith("."):
        raise ModelRepositoryError(f"invalid model name {name!r}: it must be a plain directory name")


def model_directories(repositories: list[Path]) -> dict[str, list[Path]]:
    """Model name -> the directories holding it (more than one is an error the caller reports)."""
    found: dict[str, list[Path]] = {}
    for repository in repositories:
        if not repository.is_dir():
            raise ModelRepositoryError(f"model repository {str(repository)!r} is not a directory")
        for entry in sorted(repository.iterdir()):
            if entry.is_dir() and not entry.name.startswith("."):
                found.setdefault(entry.name, []).append(entry)
    return found


def read_config(directory: Path, name: str, config_json: str | None = None) -> mc.ModelConfig:
    """The model's `ModelConfig`: `config_json` (a load request's override) or `config.pbtxt`."""
    config = mc.ModelConfig()
    if config_json is not None:
        try:
            json_format.Parse(config_json, config)
        except json_format.ParseError as e:
            raise ModelRepositoryError(f"the configuration given for model '{name}' is invalid: {e}") from e
    else:
        path = directory / CONFIG_FILE
        if not path.is_file():
            raise ModelRepositoryError(f"{path} not found: every model directory needs a {CONFIG_FILE}")
        try:
            text_format.Parse(path.read_text(), config)
        except (text_format.ParseError, UnicodeDecodeError) as e:
            raise ModelRepositoryError(f"{path}: not a valid Triton ModelConfig: {e}") from e
    if config.name and config.name != name:
        raise ModelRepositoryError(
            f"model '{name}': config name '{config.name}' must equal the model directory name '{name}'"
        )
    config.name = name
    if not config.platform and not config.backend:
        raise ModelRepositoryError(f"model '{name}': the config must set 'platform' or 'backend'")
    return config


def version_directories(directory: Path) -> list[int]:
    """Numeric version directories, ascending; names that are not numbers or start with "0" are ignored."""
    versions = [
        int(p.name)
        for p in directory.iterdir()
        if p.is_dir() and p.name.isdigit() and not p.name.startswith("0")
    ]
    return sorted(versions)


def select_versions(config: mc.ModelConfig, directory: Path) -> list[int]:
    """The versions `version_policy` asks for, ascending."""
    available = version_directories(directory)
    if not available:
        raise ModelRepositoryError(
            f"model '{config.name}' has no version directory in {directory} (numeric names such as '1')"
        )
    policy = config.version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return available
    if choice == "specific":
        wanted = sorted(set(policy.specific.versions))
        missing = [v for v in wanted if v not in available]
        if missing:
            raise ModelRepositoryError(
                f"model '{config.name}': version_policy asks for versions {missing}, which have no directory"
            )
        return wanted
    count = policy.latest.num_versions if choice == "latest" else 1
    return available[-max(count, 1) :]


def parameter(config: mc.ModelConfig, key: str) -> str | None:
    return config.parameters[key].string_value if key in config.parameters else None


def checkpoint_path(config: mc.ModelConfig, directory: Path, version: int) -> Path:
    """`model_checkpoint_path` (relative: the working directory first, then the model directory), else
    `<model>/<version>/<default_model_filename>` as the FT backend does."""
    given = parameter(config, "model_checkpoint_path")
    if given:
        path = Path(given).expanduser()
        candidates = [path] if path.is_absolute() else [Path.cwd() / path, directory / path]
        for candidate in candidates:
            if candidate.exists():
                return candidate
        tried = " or ".join(repr(str(c)) for c in candidates)
        raise ModelRepositoryError(
            f"model '{config.name}': model_checkpoint_path {given!r} not found ({tried})"
        )
    path = directory / str(version)
    if config.default_model_filename:
        path = path / config.default_model_filename
    if not path.exists():
        raise ModelRepositoryError(
            f"model '{config.name}': no model_checkpoint_path parameter and {str(path)!r} does not exist"
        )
    return path


def ft_engine_options(config: mc.ModelConfig, options: EngineOptions) -> EngineOptions:
    """The engine options of a FasterTransformer model: the server's, checked against and refined by
    `tensor_para_size`, `pipeline_para_size` and `data_type`."""
    name = config.name
    tp = parameter(config, "tensor_para_size") or "1"
    pp = parameter(config, "pipeline_para_size") or "1"
    if not tp.strip().isdigit() or not pp.strip().isdigit():
        raise ModelRepositoryError(
            f"model '{name}': tensor_para_size {tp!r} and pipeline_para_size {pp!r} must be integers"
        )
    if int(pp) != 1:
        raise ModelRepositoryError(
            f"model '{name}': pipeline_para_size is {pp}, but only 1 is supported (pipeline parallelism "
            'is not implemented); set it to "1"'
        )
    # The config says how many ranks the model runs on; a --tensor-parallel-size other than the default
    # must agree with it.
    if options.tensor_parallel_size not in (1, int(tp)):
        raise ModelRepositoryError(
            f"model '{name}': tensor_para_size is {tp} but the server runs with --tensor-parallel-size "
            f"{options.tensor_parallel_size}; they must be equal"
        )
    data_type = (parameter(config, "data_type") or "").lower()
    if not data_type and parameter(config, "is_half") == "1":
        data_type = "fp16"
    if data_type and data_type not in FT_DATA_TYPES:
        raise ModelRepositoryError(f"model '{name}': data_type {data_type!r} is not one of fp32, fp16, bf16")
    dtype = options.dtype
    if not data_type:
        pass
    elif options.dtype != "auto":
        if options.dtype != data_type:
            logger.info("model '%s': data_type %s in its config, --dtype %s wins", name, data_type, dtype)
    elif data_type == "fp16" and resolve_device(options.device).type == "cpu":
        logger.info("model '%s': data_type fp16 on CPU runs in the engine's CPU dtype (--dtype auto)", name)
    else:
        dtype = FT_DATA_TYPES[data_type]
    return dataclasses.replace(options, dtype=dtype, tensor_parallel_size=int(tp))


def check_model_type(config: mc.ModelConfig, architecture: str) -> None:
    """Log when FT's `model_type` names another architecture than the checkpoint holds."""
    model_type = parameter(config, "model_type")
    if model_type and FT_MODEL_TYPES.get(model_type.lower()) not in (None, architecture):
        logger.warning(
            "model '%s': model_type %r but the checkpoint is a %s model; serving the checkpoint",
            config.name,
            model_type,
            architecture,
        )


def write_override_files(root: Path, name: str, files: dict[str, bytes]) -> Path:
    """Write a load request's `file:<version>/<name>` contents under `root/name`; returns that directory."""
    directory = root / name
    for key, content in files.items():
        relative = Path(key.removeprefix("file:"))
        if relative.is_absolute() or ".." in relative.parts or not relative.parts:
            raise ModelRepositoryError(
                f"load file {key!r} must be a relative path inside the model directory"
            )
        target = directory / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    return directory
