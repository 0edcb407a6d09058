"""Mixture of experts under tensor parallelism: every expert split as a dense MLP (gate/up column, down
row), the router replicated; on CPU (gloo, two ranks) a Mixtral generates what one rank generates."""

from __future__ import annotations

from gptserve.config import ModelConfig
from gptserve.engine.tp_launcher import current_world
from gptserve.parallel.sharding import shard_kind
from tests.parallel.conftest import ODD_VOCAB
from tests.parallel.test_tensor_parallel import assert_close_logprobs, generate
from tests.tiny_moe import build_tiny_moe, moe_hf_config


def test_mixtral_tp2_equals_tp1(tmp_path):
    build_tiny_moe("mixtral", tmp_path, vocab_size=ODD_VOCAB)
    ref = generate(tmp_path)
    got = generate(tmp_path, tensor_parallel_size=2)
    assert current_world() is None  # closed: no worker left behind
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    assert_close_logprobs(ref, got, atol=1e-4)


def test_shard_kinds():
    mixtral = ModelConfig.from_hf(moe_hf_config("mixtral").to_dict())
    qwen = ModelConfig.from_hf(moe_hf_config("qwen3_moe").to_dict())
    block = "model.layers.0.block_sparse_moe"
    assert shard_kind(mixtral, f"{block}.experts.3.w1.weight") == "column"
    assert shard_kind(mixtral, f"{block}.experts.3.w3.weight") == "column"
    assert shard_kind(mixtral, f"{block}.experts.3.w2.weight") == "row"
    assert shard_kind(mixtral, f"{block}.gate.weight") == "replicated"
    assert shard_kind(qwen, "model.layers.0.mlp.experts.3.gate_proj.weight") == "column"
    assert shard_kind(qwen, "model.layers.0.mlp.experts.3.down_proj.weight") == "row"
    assert shard_kind(qwen, "model.layers.0.mlp.gate.weight") == "replicated"
