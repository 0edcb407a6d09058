"""Reading prompts: from the command line, a file (one per line, or JSON Lines) or standard input.

A JSON Lines record is a JSON string, or an object with `prompt` (text, or a list of token ids for a
model without a tokenizer). A file is read as JSON Lines when its name ends in `.jsonl` or its first
non-blank line starts with `{`; otherwise each non-blank line is one prompt.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TextIO

from gptserve.client.types import Prompt
from gptserve.errors import GptServeError


def _record(line: str, where: str) -> Prompt:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        raise GptServeError(f"{where}: not valid JSON ({e.msg})") from None
    if isinstance(value, dict):
        if "prompt" not in value:
            raise GptServeError(f"{where}: a JSON Lines record needs a 'prompt' field")
        value = value["prompt"]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and t >= 0 for t in value):
        return value
    raise GptServeError(f"{where}: 'prompt' must be a string or a non-empty list of token ids")


def parse_prompts(lines: Iterable[str], name: str) -> list[Prompt]:
    """Prompts from the lines of the file `name` (plain lines or JSON Lines, see the module doc)."""
    rows = [(n, line.rstrip("\r\n")) for n, line in enumerate(lines, 1)]
    rows = [(n, line) for n, line in rows if line.strip()]
    as_jsonl = name.endswith(".jsonl") or (bool(rows) and rows[0][1].lstrip().startswith("{"))
    if not as_jsonl:
        return [line for _, line in rows]
    return [_record(line, f"{name}:{n}") for n, line in rows]


def read_prompts(args: list[str], file: str | None, stdin: TextIO) -> list[Prompt]:
    """The prompts of a run: the arguments, then the file (`-` is standard input); with neither, standard
    input when it is not a terminal."""
    prompts: list[Prompt] = list(args)
    if file == "-" or (file is None and not args and not stdin.isatty()):
        prompts += parse_prompts(stdin, "<stdin>")
    elif file is not None:
        try:
            with open(file, encoding="utf-8") as f:
                prompts += parse_prompts(f, file)
        except OSError as e:
            raise GptServeError(f"cannot read prompts from {file}: {e.strerror}") from None
    if not prompts:
        raise GptServeError("no prompts: pass them as arguments, with --file FILE, or on standard input")
    return prompts
