"""The Triton weight-only int8 matrix product against dequantize-then-multiply, on fresh random inputs:
decode row counts (split-K configurations), prefill row counts, and shapes that do not divide the tiles
(GPU only)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 16, 17, 200])
@pytest.mark.parametrize("n,k", [(512, 1024), (1000, 520), (12288, 4096)])
def test_int8_matmul_matches_reference(dtype, rows, n, k):
    from gptserve.kernels.int8_matmul import int8_matmul, int8_matmul_reference

    torch.manual_seed(torch.randint(0, 2**31, ()).item())
    x = torch.randn(rows, k, device="cuda").to(dtype)
    weight = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
    scale = (torch.rand(n, device="cuda") * 0.02 + 1e-3).to(dtype)
    out = int8_matmul(x, weight, scale)
    ref = int8_matmul_reference(x, weight, scale)
    assert out.shape == (rows, n) and out.dtype == dtype
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err < 1e-2, err


def test_int8_linear_on_cuda_uses_the_kernel_and_matches_dense():
    from gptserve.layers.quantized_linear import Int8Linear

    torch.manual_seed(torch.randint(0, 2**31, ()).item())
    dense = torch.nn.Linear(768, 300, bias=True).to("cuda", torch.float16)
    quantized = Int8Linear.from_linear(dense)
    x = torch.randn(5, 768, device="cuda", dtype=torch.float16)
    out = quantized(x)
    ref = torch.nn.functional.linear(x.float(), quantized.dequantized().float(), dense.bias.float())
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2
