"""Every kind of linear layer offers the fused epilogues one interface: called it computes x @ W^T + b, and
its `product` plus its `bias` is the same output; each architecture builds its projections from such layers,
on one rank and on two; the bias + activation kernel's reference computes the models' activations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gptserve.config import ModelConfig
from gptserve.layers.activation import ACTIVATIONS
from gptserve.layers.embedding import ParallelLMHead
from gptserve.layers.linear import Linear, LinearLayer, uninitialized
from gptserve.layers.parallel_linear import ReducedLinear, RowParallelLinear, defer_reduction
from gptserve.layers.quantized_linear import Int4Linear, Int8Linear
from gptserve.layers.tuned_linear import TunedLinear
from gptserve.models.registry import model_class
from gptserve.parallel import parallel_state
from tests.helpers import ARCHS, TINY_CONFIGS


def _dense(cls: type[Linear] = Linear) -> Linear:
    torch.manual_seed(0)
    layer = uninitialized(cls, 64, 32)
    nn.init.normal_(layer.weight, std=0.1)
    nn.init.normal_(layer.bias)
    return layer


def _kinds() -> dict[str, LinearLayer]:
    deferred = _dense(RowParallelLinear)
    defer_reduction(deferred)
    return {
        "dense": _dense(),
        "tuned": TunedLinear(_dense(), {}),
        "int8": Int8Linear.from_linear(_dense()),
        "int4": Int4Linear.from_linear(_dense()),
        "row-parallel": _dense(RowParallelLinear),
        "row-parallel, deferred": deferred,
        "row-parallel int8": _dense(RowParallelLinear).wrap_quantized(Int8Linear.from_linear(_dense())),
    }


@pytest.mark.parametrize("kind", list(_kinds()))
def test_product_and_bias_make_the_output(kind):
    layer = _kinds()[kind]
    x = torch.randn(5, 64)
    assert isinstance(layer, LinearLayer) and layer.bias is not None
    torch.testing.assert_close(layer.product(x) + layer.bias, layer(x), rtol=1e-5, atol=1e-5)
    assert layer.activated(x, "gelu") is None  # only a GEMV serving this row count applies it


def test_a_quantized_row_parallel_layer_keeps_the_bias_outside():
    layer = _dense(RowParallelLinear).wrap_quantized(Int8Linear.from_linear(_dense()))
    assert isinstance(layer, ReducedLinear) and layer.inner.bias is None and layer.bias is not None


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("arch", ARCHS)
def test_models_build_their_projections_from_linear_layers(arch, world):
    config = ModelConfig.from_hf(dict(TINY_CONFIGS[arch]))
    with parallel_state.assumed_world(world), torch.device("meta"):
        net = model_class(config)(config)
    linears = {name: m for name, m in net.named_modules() if isinstance(m, nn.Linear)}
    heads = {name for name, m in linears.items() if isinstance(m, ParallelLMHead)}
    assert heads == (set() if world == 1 else {"lm_head"})  # a vocab-parallel head gathers, not fuses
    assert all(isinstance(m, LinearLayer) for name, m in linears.items() if name not in heads)
    rows = [m for m in linears.values() if isinstance(m, RowParallelLinear)]
    assert len(rows) == (0 if world == 1 else 2 * config.num_layers)


def test_the_kernel_reference_activations_are_the_models():
    pytest.importorskip("triton")
    from gptserve.kernels.bias_activation import KERNEL_ACTIVATIONS, bias_activation_reference

    x = torch.randn(4, 33) * 3
    for name in KERNEL_ACTIVATIONS:
        expected = ACTIVATIONS[name](x)
        assert torch.equal(bias_activation_reference(x, torch.zeros(33), name), expected), name
