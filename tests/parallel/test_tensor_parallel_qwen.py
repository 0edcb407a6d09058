"""Qwen2 and Qwen3 under tensor parallelism: q/k/v biases split with their rows, Qwen3's per-head
q_norm/k_norm replicated, and on CPU (gloo, two ranks) a Qwen3 generates what one rank generates."""

from __future__ import annotations

from gptserve.config import ModelConfig
from gptserve.engine.tp_launcher import current_world
from gptserve.parallel.sharding import shard_kind
from tests.parallel.conftest import ODD_VOCAB
from tests.parallel.test_tensor_parallel import assert_close_logprobs, generate
from tests.tiny_qwen import build_tiny_qwen, qwen_hf_config


def test_qwen3_tp2_equals_tp1(tmp_path):
    """Qwen3 has Qwen2's layers plus its norms; Qwen2's biases split like GPT-NeoX's and GPT-2's."""
    build_tiny_qwen("qwen3", tmp_path, vocab_size=ODD_VOCAB)
    ref = generate(tmp_path)
    got = generate(tmp_path, tensor_parallel_size=2)
    assert current_world() is None  # closed: no worker left behind
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    assert_close_logprobs(ref, got, atol=1e-4)


def test_shard_kinds():
    qwen2 = ModelConfig.from_hf(qwen_hf_config("qwen2").to_dict())
    qwen3 = ModelConfig.from_hf(qwen_hf_config("qwen3").to_dict())
    layer = "model.layers.0.self_attn"
    assert shard_kind(qwen2, f"{layer}.q_proj.bias") == shard_kind(qwen2, f"{layer}.v_proj.bias") == "column"
    assert shard_kind(qwen2, f"{layer}.o_proj.weight") == "row"
    assert (
        shard_kind(qwen3, f"{layer}.q_norm.weight")
        == shard_kind(qwen3, f"{layer}.k_norm.weight")
        == "replicated"
    )
    assert shard_kind(qwen3, f"{layer}.k_proj.weight") == "column"
