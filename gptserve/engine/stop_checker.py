"""`StopStringMatcher`: finds stop strings in a stream of text deltas and decides what may be emitted.

A stop string can arrive split over several deltas, so text that could still be the start of one is held
back until it is known not to be. The stream stops at the first point where any stop string is complete;
the result does not depend on how the text was cut into deltas.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """Stop-string state of one sequence.

    The match is the stop string that completes earliest in the text; if several complete at the same
    character the longest (earliest starting) one wins. Output ends just before it, or just after it with
    `include_stop_str_in_output`; nothing after it is ever emitted.
    """

    def __init__(self, stops: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        self._stops = list(dict.fromkeys(stops))
        self._include = include_stop_str_in_output
        # A match must be found even when it began in earlier deltas, so the last (longest stop - 1)
        # characters seen are kept; the last `_num_held` of them have not been emitted yet.
        self._lookback = max((len(s) for s in self._stops), default=1) - 1
        self._tail = ""
        self._num_held = 0
        self._matched: str | None = None

    @property
    def stopped(self) -> bool:
        return self._matched is not None

    @property
    def matched(self) -> str | None:
        """The stop string that ended the stream (the OpenAI `stop_reason`), or None."""
        return self._matched

    @property
    def held_text(self) -> str:
        """Text received but not yet emitted because it may begin a stop string."""
        return self._tail[len(self._tail) - self._num_held :]

    def feed(self, delta: str) -> tuple[str, bool]:
        """Take the next text delta; return (text safe to emit now, whether a stop string was hit)."""
        if self._matched is not None:
            return "", True
        if not self._stops:
            return delta, False
        window = self._tail + delta
        emitted_upto = len(self._tail) - self._num_held
        match = self._first_completed(window)
        if match is not None:
            start, stop = match
            self._matched = stop
            self._tail, self._num_held = "", 0
            end = start + len(stop) if self._include else start
            return window[emitted_upto:end], True
        # An included stop string is emitted anyway, so only excluded ones need their prefixes held back.
        hold = 0 if self._include else self._possible_stop_prefix(window)
        safe_end = max(len(window) - hold, emitted_upto)
        self._tail = window[max(len(window) - self._lookback, 0) :]
        self._num_held = len(window) - safe_end
        return window[emitted_upto:safe_end], False

    def flush(self) -> str:
        """End of stream without a stop string: release the held-back text."""
        held = "" if self._matched is not None else self.held_text
        self._num_held = 0
        return held

    def _first_completed(self, window: str) -> tuple[int, str] | None:
        # The tail never holds a whole stop string (the stream would have stopped), so every match found
        # here ends inside the new delta and the first occurrence of each string is its earliest end.
        best: tuple[int, int, str] | None = None
        for stop in self._stops:
            start = window.find(stop)
            if start < 0:
                continue
            key = (start + len(stop), start, stop)
            if best is None or key[:2] < best[:2]:
                best = key
        return None if best is None else (best[1], best[2])

    def _possible_stop_prefix(self, window: str) -> int:
        """Length of the longest suffix of `window` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(window)), longest, -1):
                if window.endswith(stop[:k]):
                    longest = k
                    break
        return longest
