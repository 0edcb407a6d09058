"""The one-row Triton GEMV against its float32 reference on fresh random inputs: its default tile and
every tile `gptserve tune` tries, with and without a bias, fp16 and bf16, and with each activation it
applies before rounding (GPU only); tiles that do not divide the weight and activations of more than one
row are refused before anything runs."""

from __future__ import annotations

import pytest
import torch

from gptserve.kernels.matmul_configs import MatmulConfig, candidate_configs, default_gemv_config


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k,bias", [(1000, 2048, True), (64, 1024, False), (24, 4096, True)])
def test_every_tile_matches_reference(dtype, n, k, bias):
    from gptserve.kernels.gemv import gemv, gemv_fits
    from gptserve.kernels.matmul import matmul, matmul_reference

    torch.manual_seed(torch.randint(0, 2**31, ()).item())
    device = torch.device("cuda")
    x = torch.randn(1, 2 * k, device=device).to(dtype)[:, ::2]  # a strided row
    weight = (torch.randn(n, k, device=device) * 0.05).to(dtype)
    b = torch.randn(n, device=device).to(dtype) if bias else None
    ref = matmul_reference(x, weight, b)
    tiles = [c for c in candidate_configs(1) if c.block_m == 1 and gemv_fits(weight, c)]
    assert default_gemv_config(n, k) in tiles and len(tiles) >= 4
    torch.testing.assert_close(gemv(x, weight, b), ref, rtol=2e-2, atol=2e-2)
    for config in tiles:
        out = matmul(x, weight, b, config)  # the tuner's entry point sends block_m == 1 here
        assert out.shape == (1, n) and out.dtype == dtype
        torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2, msg=lambda m, c=config: f"{c}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["gelu", "gelu_new", "relu", "silu", "quick_gelu"])
def test_bias_and_activation_in_the_epilogue(activation):
    from gptserve.kernels.bias_activation import bias_activation_reference
    from gptserve.kernels.gemv import gemv
    from gptserve.kernels.matmul import matmul_reference

    torch.manual_seed(torch.randint(0, 2**31, ()).item())
    device = torch.device("cuda")
    x = torch.randn(1, 4096, device=device).half()
    weight = (torch.randn(1024, 4096, device=device) * 0.02).half()
    bias = torch.randn(1024, device=device).half()
    product = matmul_reference(x, weight, None).float()  # float32, as the kernel has it before rounding
    expected = bias_activation_reference(product, bias, activation).half()
    torch.testing.assert_close(gemv(x, weight, bias, activation=activation), expected, rtol=1e-2, atol=1e-2)


def test_tiles_that_do_not_fit_are_refused():
    pytest.importorskip("triton")
    from gptserve.kernels.gemv import gemv

    weight = torch.zeros(1000, 520, dtype=torch.float16)
    assert default_gemv_config(1000, 520) is None  # no tile divides 520 columns
    with pytest.raises(ValueError, match="divides"):
        gemv(torch.zeros(1, 520, dtype=torch.float16), weight)
    with pytest.raises(ValueError, match="divides"):
        gemv(torch.zeros(1, 520, dtype=torch.float16), weight, config=MatmulConfig(1, 8, 1024))
    with pytest.raises(ValueError, match="one row"):
        gemv(torch.zeros(2, 2048, dtype=torch.float16), torch.zeros(64, 2048, dtype=torch.float16))
    assert default_gemv_config(4096, 16384) == MatmulConfig(1, 4, 2048, 1, 4, 3)
    assert default_gemv_config(50400, 4096).block_n == 4 and default_gemv_config(4098, 4096).block_n == 2
