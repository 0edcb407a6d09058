"""`gptserve convert` on bad input, through the real command line: a non-zero exit, a message naming
the file or the number at fault, and nothing left at DST (nor a loadable partial directory beside it)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gptserve.cli import main

from .checkpoint_writers import tiny_gptj, write_ft_cmodel, write_mtj_slim

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Pristine sources: HF dir, slim checkpoint (2 shards), c-model (2 ranks), converted dir (2 ranks)."""
    root = tmp_path_factory.mktemp("sources")
    model = tiny_gptj(root / "hf")
    converted = root / "converted"
    assert main(["convert", str(root / "hf"), str(converted), "--tensor-parallel-size", "2"]) == 0
    write_ft_cmodel(model, root / "c-model" / "2-gpu", 2)
    write_mtj_slim(model, root / "slim", shards=2)
    return root


def convert(src: Path, dst: Path, *flags: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "gptserve.cli", "--log-level", "warning", "convert", str(src), str(dst)]
        + list(flags),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode != 0, result.stdout
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]
    return result


def copy(sources: Path, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(sources / name, tmp_path / name))


def test_missing_shard(sources, tmp_path):
    slim = copy(sources, "slim", tmp_path)
    shutil.rmtree(slim / "shard_1")
    result = convert(slim, tmp_path / "out")
    assert "shard_1" in result.stderr and "cores_per_replica is 2" in result.stderr


def test_missing_ft_rank_file(sources, tmp_path):
    cmodel = copy(sources, "c-model/2-gpu", tmp_path)
    (cmodel / "model.layers.1.mlp.dense_4h_to_h.weight.1.bin").unlink()
    result = convert(cmodel, tmp_path / "out")
    assert "model.layers.1.mlp.dense_4h_to_h.weight.1.bin" in result.stderr


def test_heads_not_divisible(sources, tmp_path):
    result = convert(sources / "hf", tmp_path / "out", "--tensor-parallel-size", "3")
    assert "8 attention heads" in result.stderr and "tensor_parallel_size 3" in result.stderr


def test_dtype_mismatch_against_config(sources, tmp_path):
    converted = copy(sources, "converted", tmp_path)
    config = json.loads((converted / "config.json").read_text())
    config["gptserve"]["dtype"] = "fp16"  # the files hold fp32
    (converted / "config.json").write_text(json.dumps(config))
    result = convert(converted, tmp_path / "out")
    assert "model-rank-0-of-2.safetensors" in result.stderr and "fp16" in result.stderr


def test_shape_mismatch_against_config(sources, tmp_path):
    slim = copy(sources, "slim", tmp_path)
    config = json.loads((slim / "config.json").read_text())
    config["d_model"] = 128  # the shards hold a 64-wide model
    (slim / "config.json").write_text(json.dumps(config))
    result = convert(slim, tmp_path / "out")
    assert "shard_0" in result.stderr and "128" in result.stderr


def test_layers_mismatch_against_default_config(sources, tmp_path):
    slim = copy(sources, "slim", tmp_path)
    (slim / "config.json").unlink()  # GPT-J-6B's hyper-parameters: 8 shards, 28 layers
    result = convert(slim, tmp_path / "out")
    assert "cores_per_replica is 8" in result.stderr and "shard_2" in result.stderr


@pytest.mark.parametrize(
    "source, file",
    [
        ("c-model/2-gpu", "model.layers.0.attention.query_key_value.weight.1.bin"),
        ("converted", "model-rank-1-of-2.safetensors"),
        ("slim", "shard_1/0.npz"),
    ],
)
def test_truncated_file(sources, tmp_path, source, file):
    directory = copy(sources, source, tmp_path)
    path = directory / file
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    result = convert(directory, tmp_path / "out")
    assert str(path) in result.stderr


def test_existing_destination_needs_force(sources, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "gptserve.cli", "convert", str(sources / "hf"), str(dst)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode != 0 and "--force" in result.stderr
    assert dst.is_dir() and not any(dst.iterdir())
