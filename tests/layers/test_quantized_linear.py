"""Weight-only int8/int4 layers against their dequantized reference, and exactness on GGUF Q4_1 blocks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gptserve.layers.quantized_linear import Int4Linear, Int8Linear, quantize_linears
from gptserve.loading.default_model import default_model_path
from gptserve.loading.gguf_file import GGUFModelFile


def _linear(n: int, k: int, dtype: torch.dtype, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(k, n, bias=bias).to(dtype)
    return layer


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_matches_dequantized_reference(cls, dtype, rows):
    dense = _linear(96, 128, dtype)
    q = cls.from_linear(dense)
    x = torch.randn(rows, 128).to(dtype)
    reference = nn.functional.linear(x.float(), q.dequantized().float(), dense.bias.float())
    tolerance = 1e-4 if dtype == torch.float32 else 0.05 * reference.abs().max().item()
    assert (q(x).float() - reference).abs().max().item() < tolerance


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
@pytest.mark.parametrize("dense_copy", [False, True])
def test_product_is_the_output_without_the_bias(cls, dense_copy):
    """What a fused bias kernel adds to: `product` + bias is the layer's output, compact or dense path."""
    dense = _linear(64, 128, torch.bfloat16)
    q = cls.from_linear(dense)
    if dense_copy:
        q.dense = dense.weight.detach()
    for rows in (1, cls.small_batch + 1):
        x = torch.randn(2, rows, 128).to(torch.bfloat16)  # leading dimensions are kept
        y = q.product(x)
        assert y.shape == (2, rows, 64)
        torch.testing.assert_close(y + q.bias, q(x), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("cls,bound", [(Int8Linear, 0.01), (Int4Linear, 0.1)])
def test_quantization_error_is_bounded(cls, bound):
    dense = _linear(64, 256, torch.float32)
    q = cls.from_linear(dense)
    err = (q.dequantized() - dense.weight).abs().max().item()
    assert err < bound * dense.weight.abs().max().item()


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_dense_copy_serves_large_batches_and_compact_small_ones(cls):
    dense = _linear(64, 128, torch.float32)
    q = cls.from_linear(dense)
    q.dense = dense.weight.detach()
    big = torch.randn(cls.small_batch + 1, 128)
    assert torch.allclose(q(big), dense(big), atol=1e-6)  # exactly the dense GEMM
    small = torch.randn(cls.small_batch, 128)
    ref = nn.functional.linear(small, q.dequantized(), dense.bias)
    assert torch.allclose(q(small), ref, atol=1e-4)
    assert not torch.allclose(q(small), dense(small), atol=1e-6)  # the compact weights, not the dense


def test_int4_represents_gguf_q4_1_blocks_exactly():
    gguf = GGUFModelFile(default_model_path())
    name = "model.layers.0.mlp.down_proj.weight"
    assert gguf.raw_tensor(name).qtype.name == "Q4_1"
    weight = gguf.dequantized(name)
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data.copy_(weight)
    q = Int4Linear.from_linear(layer)
    assert (q.dequantized() - weight).abs().max().item() < 1e-5


def test_quantize_linears_swaps_layers_and_head():
    model = nn.Sequential()
    model.add_module("proj", _linear(32, 64, torch.float32))
    model.add_module("lm_head", _linear(48, 64, torch.float32, bias=False))
    counts = quantize_linears(model, "int4", "int8")
    assert isinstance(model.proj, Int4Linear) and isinstance(model.lm_head, Int8Linear)
    assert counts == {"int4": 1, "int8": 1}
