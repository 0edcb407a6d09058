"""Printing benchmark results: an aligned table on stdout and, if asked, JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n{title}")
    print("-" * (width + 24))
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def write_json(path: str | None, data: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=2))


def gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB/s"
