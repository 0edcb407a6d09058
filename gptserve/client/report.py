"""Printing results: a table sized to the terminal (texts wrapped, never cut) or JSON."""

from __future__ import annotations

import json
import shutil
import textwrap
from collections.abc import Sequence

from gptserve.client.types import Result

FIXED = [("#", 3), ("tokens", 6), ("ttft", 7), ("latency", 7), ("finish", 6)]


def _one_line(text: object) -> str:
    """Text with line breaks and tabs made visible, so a row stays a row."""
    return str(text).replace("\r", "").replace("\n", "⏎ ").replace("\t", " ")


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def table(results: Sequence[Result], width: int | None = None) -> str:
    """The results as a table: number, tokens, time to first text, latency, finish reason, prompt, output."""
    width = width or shutil.get_terminal_size((120, 24)).columns
    fixed = sum(w for _, w in FIXED) + 2 * (len(FIXED) + 1)
    room = max(30, width - fixed)
    prompt_w = max(12, room // 3)
    output_w = max(12, room - prompt_w)
    widths = [w for _, w in FIXED] + [prompt_w, output_w]
    header = [name for name, _ in FIXED] + ["prompt", "output"]
    cells = (h.ljust(w) if i >= 5 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))
    lines = ["  ".join(cells).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for r in results:
        output = f"error: {r.error}" if r.error else r.text
        cells = [
            str(r.index),
            "-" if r.num_tokens is None else str(r.num_tokens),
            _seconds(r.ttft_s),
            _seconds(r.latency_s),
            "error" if r.error else (r.finish_reason or "-"),
        ]
        prompt_lines = textwrap.wrap(_one_line(r.prompt), prompt_w) or [""]
        output_lines = textwrap.wrap(_one_line(output), output_w, drop_whitespace=False) or [""]
        for row in range(max(len(prompt_lines), len(output_lines))):
            fixed_cells = (
                [c.rjust(w) for c, (_, w) in zip(cells, FIXED)] if row == 0 else [" " * w for _, w in FIXED]
            )
            texts = [
                (prompt_lines[row] if row < len(prompt_lines) else "").ljust(prompt_w),
                output_lines[row] if row < len(output_lines) else "",
            ]
            lines.append("  ".join(fixed_cells + texts).rstrip())
    return "\n".join(lines)


def summary(results: Sequence[Result], wall_s: float) -> str:
    """One line: requests, failures, tokens and the rate over the whole run."""
    failed = sum(1 for r in results if r.error)
    tokens = [r.num_tokens for r in results if r.num_tokens is not None and not r.error]
    line = f"{len(results)} request{'' if len(results) == 1 else 's'}, {failed} failed, {wall_s:.2f}s"
    if tokens:
        line += f", {sum(tokens)} tokens generated ({sum(tokens) / max(wall_s, 1e-9):.1f} tokens/s)"
    return line


def as_json(results: Sequence[Result], model: str, protocol: str, wall_s: float) -> str:
    """The run as one JSON document: the model, the protocol, the wall time and every result."""
    doc = {
        "model": model,
        "protocol": protocol,
        "wall_s": round(wall_s, 4),
        "results": [r.as_json() for r in results],
    }
    return json.dumps(doc, ensure_ascii=False, indent=2)
