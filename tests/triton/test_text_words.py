"""The text form's `stop_words` and `bad_words`: per-row lists from BYTES tensors of every accepted shape or
from request parameters, padding dropped, and `SamplingParams` that stop on the strings and ban the
tokenized words; every malformed list is a 400 naming where it came from."""

from __future__ import annotations

import numpy as np
import pytest

from gptserve.sampling_params import SamplingParams
from gptserve.triton.text_words import with_words, word_rows
from gptserve.triton.types import InferRequest, TritonError


def words(rows) -> np.ndarray:
    out = np.empty(np.shape(rows), dtype=object)
    out[...] = rows
    return out


def test_tensor_rows_broadcast_and_padding():
    assert word_rows({"stop_words": words([[b"a", b""], [b"b", b"c"]])}, {}, "stop_words", 2) == (
        [["a"], ["b", "c"]],
        "input 'stop_words'",
    )
    assert word_rows({"bad_words": words([[b"x", b"y"]])}, {}, "bad_words", 3)[0] == [["x", "y"]] * 3
    assert word_rows({"bad_words": words([b"x", b"y"])}, {}, "bad_words", 2)[0] == [["x", "y"]] * 2
    assert word_rows({"bad_words": np.array(["\u00e9t\u00e9"])}, {}, "bad_words", 1)[0] == [["\u00e9t\u00e9"]]
    assert word_rows({}, {}, "bad_words", 2)[0] == [[], []]


def test_parameters_and_the_stop_alias():
    assert word_rows({}, {"stop_words": "end"}, "stop_words", 2) == (
        [["end"], ["end"]],
        "parameter 'stop_words'",
    )
    assert word_rows({}, {"stop": ["a", "", "b"]}, "stop_words", 1) == ([["a", "b"]], "parameter 'stop'")
    tensor = {"stop_words": words([[b"t"]])}
    assert word_rows(tensor, {"stop_words": "p"}, "stop_words", 1)[0] == [["t"]]  # the input wins
    assert word_rows({}, {"stop": "s"}, "bad_words", 1)[0] == [[]]  # `stop` is no bad word


@pytest.mark.parametrize(
    ("inputs", "parameters", "message"),
    [
        ({"stop_words": np.array([[1, 2]], np.int32)}, {}, "input 'stop_words' must be BYTES"),
        ({"stop_words": words([[b"\xff"]])}, {}, "input 'stop_words' holds bytes that are not UTF-8"),
        ({"stop_words": words([[5]])}, {}, "input 'stop_words' must hold strings"),
        ({"stop_words": words([[b"a"], [b"b"], [b"c"]])}, {}, r"input 'stop_words' has shape \[3, 1\]"),
        ({"stop_words": words([[[b"a"]]])}, {}, "input 'stop_words' has shape"),
        ({}, {"stop_words": 5}, "parameter 'stop_words' must be a string or a list of strings"),
        ({}, {"stop": ["a", 1]}, "parameter 'stop' must be"),
    ],
)
def test_malformed_lists_name_their_source(inputs, parameters, message):
    with pytest.raises(TritonError, match=message) as info:
        word_rows(inputs, parameters, "stop_words", 2)
    assert info.value.status == 400


def tokenize(word: str) -> list[int]:
    return [ord(c) for c in word.strip()]


def test_with_words_adds_stops_and_tokenized_bans():
    params = [SamplingParams(stop=["old"], bad_words_ids=[[1]]), SamplingParams()]
    request = InferRequest(
        "m",
        inputs={"stop_words": words([[b"x", b""], [b"y", b"z"]]), "bad_words": words([[b"ab", b" "]])},
    )
    first, second = with_words(request, params, tokenize)
    assert first.stop == ["old", "x"] and second.stop == ["y", "z"]
    assert first.bad_words_ids == [[1], [97, 98]] and second.bad_words_ids == [[97, 98]]  # " " has no ids
    assert params[0].stop == ["old"]  # the given params are left alone

    unchanged = [SamplingParams()]
    assert with_words(InferRequest("m"), unchanged, tokenize)[0] is unchanged[0]


def test_too_many_stop_words_is_a_400_naming_the_source():
    many = [str(i) for i in range(17)]
    for request, source in (
        (InferRequest("m", inputs={"stop_words": words([[w.encode() for w in many]])}), "input 'stop_words'"),
        (InferRequest("m", parameters={"stop": many}), "parameter 'stop'"),
    ):
        with pytest.raises(TritonError, match=f"{source}: stop may hold at most 16") as info:
            with_words(request, [SamplingParams()], tokenize)
        assert info.value.status == 400
