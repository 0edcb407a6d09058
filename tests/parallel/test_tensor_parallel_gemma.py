"""Gemma under tensor parallelism: q/k/v and gate/up split as Llama's, each rank soft-capping its own
heads' scores; on CPU (gloo, two ranks) a tiny Gemma 2 generates what one rank generates."""

from __future__ import annotations

from gptserve.engine.tp_launcher import current_world
from tests.parallel.conftest import ODD_VOCAB
from tests.parallel.test_tensor_parallel import assert_close_logprobs, generate
from tests.tiny_gemma import build_tiny_gemma


def test_gemma2_tp2_equals_tp1(tmp_path):
    build_tiny_gemma("gemma2", tmp_path, vocab_size=ODD_VOCAB, num_hidden_layers=2)
    ref = generate(tmp_path)
    got = generate(tmp_path, tensor_parallel_size=2)
    assert current_world() is None  # closed: no worker left behind
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    assert_close_logprobs(ref, got, atol=1e-4)
