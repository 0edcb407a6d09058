"""The fused bias + activation kernel against its plain-PyTorch reference on fresh random inputs, for every
activation it knows, in the three dtypes (GPU only)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("activation", ["gelu", "gelu_new", "relu", "silu", "quick_gelu"])
def test_bias_activation_matches_reference(activation, dtype):
    from gptserve.kernels.bias_activation import bias_activation_, bias_activation_reference

    torch.manual_seed(torch.randint(0, 2**31, ()).item())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: Triton's interpreter
    rows, width = 3, 1531  # the last block is partial and rows straddle blocks
    y = (torch.randn(rows, width, device=device) * 3).to(dtype)
    bias = torch.randn(width, device=device).to(dtype)
    expected = bias_activation_reference(y, bias, activation)
    out = bias_activation_(y, bias, activation)
    assert out.data_ptr() == y.data_ptr()  # in place
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
