"""Serving Triton kernels from linear layers: the one-row GEMV wraps the fp16/bf16 layers its tile divides;
the tuning report's picks wrap exactly the layers they name and its cuBLAS choices drop the default
GEMV; a wrapped layer computes what the plain layer does for every row count not picked (and exposes its
weight, bias and bias-free product); the tuner's choice of what serves follows the timings."""

from __future__ import annotations

import torch
from torch import nn

from gptserve.kernels.matmul_configs import MatmulConfig
from gptserve.layers.linear import Linear
from gptserve.layers.tuned_linear import TunedLinear, apply_tuned_configs, use_gemv_for_one_row
from gptserve.tuning.gemm_tuner import TunedGemm, _choose

CONFIG = {"block_m": 16, "block_n": 64, "block_k": 64, "split_k": 4, "num_warps": 4, "num_stages": 4}


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc_in = Linear(8, 32)
        self.fc_out = Linear(32, 8)
        self.other = Linear(8, 32)  # same shape as fc_in, another name


def test_picks_wrap_the_layers_they_name():
    torch.manual_seed(0)
    net = nn.Sequential(_Block(), _Block())
    picks = [
        {"name": "fc_in", "n": 32, "k": 8, "rows": 4, "served": "triton", "triton_config": CONFIG},
        {"name": "fc_in", "n": 32, "k": 8, "rows": 16, "served": "triton", "triton_config": CONFIG},
        {"name": "fc_in", "n": 32, "k": 8, "rows": 8, "served": "cublas", "triton_config": CONFIG},
        # no layer of this shape:
        {"name": "fc_out", "n": 99, "k": 32, "rows": 4, "served": "triton", "triton_config": CONFIG},
        {"name": "fc_out", "n": 8, "k": 32, "rows": 4, "served": "tunableop", "triton_config": None},
    ]
    plain = [block.fc_in for block in net]
    assert apply_tuned_configs(net, picks) == 2
    for block, inner in zip(net, plain):
        assert isinstance(block.fc_in, TunedLinear) and block.fc_in.inner is inner
        assert sorted(block.fc_in.configs) == [4, 16] and block.fc_in.configs[4].split_k == 4
        assert type(block.fc_out) is Linear and type(block.other) is Linear
    # rows that were not picked (and every call off CUDA in these tests) go to the plain layer's GEMM
    layer, inner = net[0].fc_in, plain[0]
    x = torch.randn(3, 5, 8)
    assert torch.equal(layer(x), inner(x))
    assert torch.equal(layer.product(x) + layer.bias, inner(x))
    assert layer.weight is inner.weight and layer.bias is inner.bias


class _Wide(nn.Module):
    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.qkv = Linear(256, 768, dtype=dtype)
        self.fc_out = Linear(1024, 256, bias=False, dtype=dtype)
        self.odd = Linear(100, 256, dtype=dtype)  # no GEMV tile divides 100 columns


def test_one_row_gemv_wraps_the_half_precision_layers_it_fits():
    net = nn.Sequential(_Wide(torch.float16), _Wide(torch.bfloat16), _Wide(torch.float32))
    assert use_gemv_for_one_row(net) == 4
    for block in net[:2]:
        assert isinstance(block.qkv, TunedLinear) and isinstance(block.fc_out, TunedLinear)
        assert block.qkv.configs == {1: MatmulConfig(1, 4, 256, 1, 4, 3)}
        assert block.fc_out.configs == {1: MatmulConfig(1, 4, 1024, 1, 4, 3)}
        assert type(block.odd) is Linear
    assert all(type(layer) is Linear for layer in net[2].children())
    # bias and activation join the product only where the GEMV serves the row count
    assert net[0].qkv.activated(torch.zeros(2, 256, dtype=torch.float16), "gelu") is None


def test_the_report_replaces_or_drops_the_default_gemv():
    net = nn.Sequential(_Wide(torch.float16))
    use_gemv_for_one_row(net)
    qkv, fc_out = net[0].qkv.inner, net[0].fc_out.inner
    split = {**CONFIG, "block_m": 16}
    gemms = [
        {"name": "qkv", "n": 768, "k": 256, "rows": 1, "served": "cublas", "triton_config": None},
        {"name": "qkv", "n": 768, "k": 256, "rows": 8, "served": "triton", "triton_config": split},
        {"name": "fc_out", "n": 256, "k": 1024, "rows": 1, "served": "tunableop", "triton_config": None},
        {"name": "odd", "n": 256, "k": 100, "rows": 1, "served": "cublas", "triton_config": None},
    ]
    assert apply_tuned_configs(net, gemms) == 1
    assert isinstance(net[0].qkv, TunedLinear) and net[0].qkv.inner is qkv
    assert net[0].qkv.configs == {8: MatmulConfig(**split)}  # cuBLAS serves one row, the pick eight
    assert net[0].fc_out is fc_out  # nothing Triton left: the plain layer again
    assert type(net[0].odd) is Linear


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
