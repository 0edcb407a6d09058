"""FasterTransformer tensor interface: word lists, sampling scalars, output assembly, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from gptserve.triton import ft_tensors as ft
from gptserve.triton.types import TritonError


def u32(rows):
    return np.array(rows, dtype=np.uint32)


def test_word_list_round_trip_and_empty():
    rows = [[[5, 6], [7]], [], [[9, 9, 9]]]
    array = ft.to_word_list(rows)
    assert array.dtype == np.int32 and array.shape == (3, 2, 3)
    assert array[0].tolist() == [[5, 6, 7], [2, 3, -1]]
    assert array[1].tolist() == [[0, 0, 0], [-1, -1, -1]]
    assert ft.parse_word_list(array, "bad_words_list", 3) == rows
    empty = np.array([[[0], [-1]]], dtype=np.int32)
    assert ft.parse_word_list(empty, "stop_words_list", 2) == [[], []]


def test_word_list_shared_by_all_rows_and_errors():
    shared = np.array([[1, 2, 3], [1, 3, -1]], dtype=np.int32)  # [2, L]: every row
    assert ft.parse_word_list(shared, "bad_words_list", 2) == [[[1], [2, 3]], [[1], [2, 3]]]
    with pytest.raises(TritonError, match="bad_words_list.*shape"):
        ft.parse_word_list(np.zeros((2, 3, 4), np.int32), "bad_words_list", 2)
    with pytest.raises(TritonError, match="stop_words_list.*3 rows but the batch has 2"):
        ft.parse_word_list(np.zeros((3, 2, 1), np.int32), "stop_words_list", 2)
    with pytest.raises(TritonError, match="offset 5"):
        ft.parse_word_list(np.array([[[1, 2], [5, -1]]], np.int32), "bad_words_list", 1)


def test_scalar_shapes():
    assert ft.row_values(np.array([[3], [4]]), "runtime_top_k", 2) == [3, 4]
    assert ft.row_values(np.array([3, 4]), "runtime_top_k", 2) == [3, 4]
    assert ft.row_values(np.array([7]), "runtime_top_k", 3) == [7, 7, 7]
    assert ft.row_values(np.array(7), "runtime_top_k", 2) == [7, 7]
    assert ft.row_values(None, "runtime_top_k", 2) is None
    with pytest.raises(TritonError, match="runtime_top_k.*shape \\[3\\]"):
        ft.row_values(np.array([1, 2, 3]), "runtime_top_k", 2)


def request(**inputs):
    base = {
        "input_ids": u32([[1, 2, 3], [4, 5, 50256]]),
        "input_lengths": u32([[3], [2]]),
        "request_output_len": u32([[4], [2]]),
    }
    base.update(inputs)
    return ft.parse_token_request(base, eos_token_ids=set(), default_end_id=None)


def test_ft_defaults_are_greedy_and_rows_are_unpadded():
    req = request()
    assert req.prompts == [[1, 2, 3], [4, 5]]
    assert req.output_lens == [4, 2] and req.max_input_len == 3
    for p in req.params:
        assert p.greedy and p.beam_width == 1 and p.logprobs is None and p.stop_token_ids == []
    assert not req.return_log_probs


def test_sampling_scalars_map_per_row():
    req = request(
        runtime_top_k=u32([[0], [40]]),
        runtime_top_p=np.array([[0.9], [0.0]], np.float32),
        temperature=np.array([0.7], np.float32),
        repetition_penalty=np.array([[1.1], [1.0]], np.float32),
        random_seed=np.array([[11], [12]], np.uint64),
        is_return_log_probs=np.array([[True], [True]]),
        min_length=u32([1]),
        end_id=u32([[50256], [50256]]),
        bad_words_list=ft.to_word_list([[[7, 8]], []]),
        stop_words_list=ft.to_word_list([[], [[9]]]),
    )
    a, b = req.params
    assert not a.greedy and a.top_k == 0 and a.top_p == pytest.approx(0.9)
    assert a.temperature == pytest.approx(0.7) and a.seed == 11 and a.min_tokens == 1
    assert a.repetition_penalty == pytest.approx(1.1)
    assert b.top_k == 40 and b.top_p == 1.0 and b.seed == 12
    assert a.bad_words_ids == [[7, 8]] and b.bad_words_ids == []
    assert a.stop_token_sequences == [] and b.stop_token_sequences == [[9]]
    # end_id stops; the model's EOS (not end_id here) does not, as in FT.
    assert a.stop_token_ids == [50256] and a.ignore_eos
    assert req.return_log_probs and a.logprobs == 0
    assert (
        ft.parse_token_request(
            {"input_ids": u32([[1]]), "request_output_len": u32([1]), "end_id": u32([2])}, {2}, None
        )
        .params[0]
        .ignore_eos
        is False
    )
    # Beams too end on end_id alone, with the word lists and penalties of their row.
    beams = request(
        end_id=u32([50256]),
        beam_width=u32([[2], [2]]),
        repetition_penalty=np.array([[1.3], [1.0]], dtype=np.float32),
        bad_words_list=np.array([[[7, 8], [2, -1]], [[0, 0], [-1, -1]]], dtype=np.int32),
    ).params[0]
    assert beams.use_beam_search and beams.ignore_eos and beams.stop_token_ids == [50256]
    assert beams.repetition_penalty == pytest.approx(1.3) and beams.bad_words_ids == [[7, 8]]


def test_top_k_one_and_beam():
    assert request(runtime_top_k=u32([1]), runtime_top_p=np.array([0.5], np.float32)).params[0].greedy
    req = request(beam_width=u32([[2], [2]]))
    assert req.beam_width == 2 and all(p.beam_width == 2 and p.n == 2 for p in req.params)


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"input_lengths": u32([[4], [2]])}, "input_lengths' row 0 is 4, outside \\[0, 3\\]"),
        ({"request_output_len": u32([[0], [2]])}, "request_output_len' row 0 is 0"),
        ({"input_ids": u32([[[1]]])}, "input_ids' has shape \\[1, 1, 1\\]"),
        ({"input_lengths": u32([[0], [2]])}, "empty prompt needs 'start_id'"),
        ({"runtime_top_p": np.array([1.5], np.float32)}, "runtime_top_p' must be in \\[0, 1\\]"),
        ({"beam_width": u32([[1], [2]])}, "beam_width' must be the same"),
        ({"repetition_penalty": np.array([0.0], np.float32)}, "repetition_penalty"),
        ({"random_seed": np.array([-1], np.int32)}, "random_seed' must be >= 0"),
    ],
)
def test_bad_input_names_the_tensor(inputs, message):
    with pytest.raises(TritonError, match=message) as info:
        request(**inputs)
    assert info.value.status == 400


def test_missing_required_inputs():
    with pytest.raises(TritonError, match="'input_ids' is required"):
        ft.parse_token_request({}, set(), None)
    with pytest.raises(TritonError, match="'request_output_len' is required"):
        ft.parse_token_request({"input_ids": u32([[1]])}, set(), None)


def test_start_id_is_the_prompt_of_empty_rows():
    req = request(input_lengths=u32([[0], [2]]), start_id=u32([220]))
    assert req.prompts == [[220], [4, 5]]


def test_assemble_outputs_includes_prompt_and_pads_with_end_id():
    req = request(end_id=u32([50256]), is_return_log_probs=np.array([True]))
    results = [
        [ft.BeamResult([10, 11, 12, 13], -1.5, [-0.5, -0.25, -0.5, -0.25])],
        [ft.BeamResult([20, 50256], -0.75, [-0.5, -0.25])],
    ]
    out = ft.assemble_outputs(req, results)
    ids = out["output_ids"]
    assert ids.dtype == np.uint32 and ids.shape == (2, 1, 3 + 4)
    assert ids[0, 0].tolist() == [1, 2, 3, 10, 11, 12, 13]
    assert ids[1, 0].tolist() == [4, 5, 20, 50256, 50256, 50256, 50256]
    assert out["sequence_length"].tolist() == [[7], [4]]
    assert out["cum_log_probs"].dtype == np.float32 and out["cum_log_probs"].shape == (2, 1)
    assert out["output_log_probs"].shape == (2, 1, 4)
    assert out["output_log_probs"][1, 0].tolist() == [-0.5, -0.25, 0.0, 0.0]
    assert "cum_log_probs" not in ft.assemble_outputs(request(), results)
