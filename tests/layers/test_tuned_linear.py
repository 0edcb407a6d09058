"""Serving `gptserve tune`'s Triton picks: the report's picks wrap exactly the layers they name, a wrapped
layer computes what the plain layer does for every row count not picked (and exposes its weight, bias
and bias-free product), and the tuner's choice of what serves follows the timings."""

from __future__ import annotations

import torch
from torch import nn

from gptserve.layers.tuned_linear import TunedLinear, apply_tuned_configs
from gptserve.tuning.gemm_tuner import TunedGemm, _choose

CONFIG = {"block_m": 16, "block_n": 64, "block_k": 64, "split_k": 4, "num_warps": 4, "num_stages": 4}


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc_in = nn.Linear(8, 32)
        self.fc_out = nn.Linear(32, 8)
        self.other = nn.Linear(8, 32)  # same shape as fc_in, another name


def test_picks_wrap_the_layers_they_name():
    torch.manual_seed(0)
    net = nn.Sequential(_Block(), _Block())
    picks = [
        {"name": "fc_in", "n": 32, "k": 8, "rows": 4, "triton_config": CONFIG},
        {"name": "fc_in", "n": 32, "k": 8, "rows": 16, "triton_config": CONFIG},
        {"name": "fc_out", "n": 99, "k": 32, "rows": 4, "triton_config": CONFIG},  # no layer of that shape
    ]
    plain = [block.fc_in for block in net]
    assert apply_tuned_configs(net, picks) == 2
    for block, inner in zip(net, plain):
        assert isinstance(block.fc_in, TunedLinear) and block.fc_in.inner is inner
        assert sorted(block.fc_in.configs) == [4, 16] and block.fc_in.configs[4].split_k == 4
        assert type(block.fc_out) is nn.Linear and type(block.other) is nn.Linear
    # rows that were not picked (and every call off CUDA in these tests) go to the plain layer's GEMM
    layer, inner = net[0].fc_in, plain[0]
    x = torch.randn(3, 5, 8)
    assert torch.equal(layer(x), inner(x))
    assert torch.equal(layer.product(x) + layer.bias, inner(x))
    assert layer.weight is inner.weight and layer.bias is inner.bias


def _gemm(default_ms: float, tuned_ms: float, triton_ms: float | None) -> TunedGemm:
    gemm = TunedGemm("fc_in", 1, 32, 8, False, 2, default_ms, tuned_ms)
    gemm.triton_ms = triton_ms
    return gemm


def test_the_fastest_serves_where_it_beats_the_default():
    cases = [
        ((1.0, 0.9, 0.95), "tunableop"),
        ((1.0, 0.9, 0.8), "triton"),
        ((1.0, 0.99, 0.995), "cublas"),  # neither wins by 2%
        ((1.0, 1.2, None), "cublas"),  # no Triton timing (float32, or no configuration ran)
    ]
    for timings, served in cases:
        gemm = _gemm(*timings)
        _choose(gemm, 0.02)
        assert gemm.served == served and gemm.kept == (served == "tunableop")
        assert gemm.served_ms == {"cublas": timings[0], "tunableop": timings[1], "triton": timings[2]}[served]
    gemm = _gemm(1.0, 1.3, 1.1)
    _choose(gemm, -float("inf"))  # --keep all: the faster pick serves even when slower than the default
    assert gemm.served == "triton"
