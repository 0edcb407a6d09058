"""Fixtures for tensor-parallel tests: tiny checkpoints with a vocabulary that does not split evenly."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ARCHS, build_tiny_model

# Odd, so the padded vocab-parallel embedding and head are exercised end to end.
ODD_VOCAB = 509


@pytest.fixture(scope="session")
def odd_vocab_models(tmp_path_factory) -> dict[str, Path]:
    """arch -> directory of a tiny random checkpoint with ODD_VOCAB tokens."""
    return {arch: _build(arch, tmp_path_factory.mktemp(f"tp-{arch}")) for arch in ARCHS}


def _build(arch: str, path: Path) -> Path:
    build_tiny_model(arch, path, vocab_size=ODD_VOCAB)
    return path
