"""Phi-3 under tensor parallelism: its fused qkv_proj and gate_up_proj split part by part, so on CPU
(gloo, two ranks) a tiny Phi-3 with GQA generates what one rank generates."""

from __future__ import annotations

from gptserve.engine.tp_launcher import current_world
from tests.parallel.conftest import ODD_VOCAB
from tests.parallel.test_tensor_parallel import assert_close_logprobs, generate
from tests.tiny_phi3 import build_tiny_phi3


def test_phi3_tp2_equals_tp1(tmp_path):
    build_tiny_phi3(tmp_path, vocab_size=ODD_VOCAB)
    ref = generate(tmp_path)
    got = generate(tmp_path, tensor_parallel_size=2)
    assert current_world() is None  # closed: no worker left behind
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    assert_close_logprobs(ref, got, atol=1e-4)
