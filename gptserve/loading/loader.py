"""`load_checkpoint`: which reader a model path takes, by what the path holds."""

from __future__ import annotations

from pathlib import Path

from gptserve.errors import ModelLoadError
from gptserve.loading.checkpoint import Checkpoint
from gptserve.loading.converted_dir import is_converted_dir, read_converted_checkpoint
from gptserve.loading.default_model import default_model_path
from gptserve.loading.ft_cmodel import is_ft_cmodel_dir, read_ft_checkpoint
from gptserve.loading.gguf_file import read_gguf_checkpoint
from gptserve.loading.hf_dir import read_hf_checkpoint
from gptserve.loading.mtj_slim import is_mtj_slim_dir, read_mtj_checkpoint


def load_checkpoint(path: str | Path | None) -> Checkpoint:
    """Read a model: None -> the embedded default, a `.gguf` file, a gptserve converted directory, a
    FasterTransformer c-model directory, a mesh-transformer-jax slim checkpoint or an HF directory."""
    path = default_model_path() if path is None else Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {str(path)!r} does not exist")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return read_gguf_checkpoint(path)
        raise ModelLoadError(
            f"{str(path)!r} is a file but not a .gguf file; "
            "pass a .gguf file or a Hugging Face model directory (with config.json)"
        )
    if is_converted_dir(path):
        return read_converted_checkpoint(path)
    if is_ft_cmodel_dir(path):
        return read_ft_checkpoint(path)
    if is_mtj_slim_dir(path):
        return read_mtj_checkpoint(path)
    if (path / "config.json").is_file():
        return read_hf_checkpoint(path)
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    hint = f"; it holds GGUF files, pass one of them: {', '.join(ggufs)}" if ggufs else ""
    raise ModelLoadError(f"{str(path)!r} is a directory without config.json, so not a model directory{hint}")
