"""Progress bars for long work (loading, conversion, benchmarks, batches of requests).

A bar is drawn on standard error only when it is a terminal and logging is at `info` or more verbose,
so `--log-level warning`, pipes and CI logs stay free of carriage-return noise.
"""

from __future__ import annotations

import logging
import sys
from typing import Any


def progress_quiet() -> bool:
    """True when progress bars should stay hidden."""
    return not sys.stderr.isatty() or logging.getLogger().getEffectiveLevel() > logging.INFO


def progress_bar(total: int | None = None, desc: str | None = None, unit: str = "it", **kwargs: Any):
    """A tqdm bar on standard error, disabled when `progress_quiet()`; use it as a context manager."""
    from tqdm import tqdm

    kwargs.setdefault("disable", progress_quiet())
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, **kwargs)
