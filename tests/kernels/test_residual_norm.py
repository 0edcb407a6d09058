"""The fused residual add + LayerNorm/RMSNorm kernel against its plain-PyTorch reference and against the
unfused modules, on fresh random inputs: one or two deltas, with and without a bias, GPT-J's and
Llama's widths, a width that is not a power of two, padding rows of strided views (GPU only)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.gpu

TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: Triton's interpreter


@pytest.mark.parametrize(
    "rows,hidden,rms,two_deltas,bias,dtype",
    [
        (1, 4096, False, True, True, torch.float16),  # GPT-J decode: x + attn + mlp + fc_out bias
        (37, 4096, False, False, True, torch.bfloat16),  # under tensor parallelism: one reduced delta
        (5, 576, True, False, False, torch.bfloat16),  # Llama-style RMSNorm
        (3, 1000, False, True, False, torch.float32),  # not a power of two
    ],
)
def test_residual_norm_matches_reference(rows, hidden, rms, two_deltas, bias, dtype):
    from gptserve.kernels.residual_norm import residual_norm, residual_norm_reference

    torch.manual_seed(torch.randint(0, 2**31, ()).item())
    device = _device()

    def rand(*shape):
        return torch.randn(*shape, device=device).to(dtype)

    residual = rand(rows, hidden) * 4
    wide = rand(rows, 2 * hidden)  # a strided view, as a slice of a larger output is
    delta, delta2 = wide[:, :hidden], (rand(rows, hidden) if two_deltas else None)
    weight, norm_bias = rand(hidden), (None if rms else rand(hidden))
    bias_vector = rand(hidden) if bias else None
    args = (residual, delta, weight, norm_bias, 1e-5, rms, delta2, bias_vector)

    out, new_residual = residual_norm(*args)
    ref_out, ref_residual = residual_norm_reference(*args)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(new_residual, ref_residual, rtol=tol, atol=tol)
    # a residual one unit apart (the float32 sums fell either side of a rounding boundary) moves its
    # normalised value, which may then round one more unit apart
    torch.testing.assert_close(out, ref_out, rtol=2 * tol, atol=4 * tol)

    # and the unfused modules (float32 inputs: no rounding between the steps to tell them apart)
    if dtype == torch.float32:
        norm = nn.LayerNorm(hidden, eps=1e-5).to(device)
        norm.weight.data, norm.bias.data = weight, norm_bias
        total = residual + delta + delta2  # the float32 case has two deltas and no bias
        torch.testing.assert_close(new_residual, total, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out, norm(total), rtol=1e-4, atol=1e-4)


def test_residual_norm_of_no_rows():
    from gptserve.kernels.residual_norm import residual_norm

    device = _device()
    empty = torch.empty(0, 64, device=device)
    out, new_residual = residual_norm(empty, empty, torch.ones(64, device=device), None, 1e-5)
    assert out.shape == new_residual.shape == (0, 64)
