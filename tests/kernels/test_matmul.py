"""The tiled Triton matrix product `gptserve tune` times against cuBLAS, against its float32 reference on
fresh random inputs: every candidate configuration for decode and prompt row counts (the one-row GEMV's
tiles included), with and without a bias, shapes that do not divide the tiles, a strided activation (GPU
only)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,n,k,bias", [(1, 1000, 520, True), (1, 1000, 2048, False),
                                           (7, 768, 1024, False), (40, 300, 256, True),
                                           (200, 520, 384, True)])  # fmt: skip
def test_every_candidate_matches_reference(dtype, rows, n, k, bias):
    from gptserve.kernels.matmul import matmul, matmul_reference
    from gptserve.kernels.matmul_configs import candidate_configs

    torch.manual_seed(torch.randint(0, 2**31, ()).item())
    device = torch.device("cuda")
    x = torch.randn(rows, 2 * k, device=device).to(dtype)[:, :k]  # rows of a wider tensor
    weight = (torch.randn(n, k, device=device) * 0.05).to(dtype)
    b = torch.randn(n, device=device).to(dtype) if bias else None
    ref = matmul_reference(x, weight, b)
    for config in candidate_configs(rows):
        if config.block_m == 1 and (n % config.block_n or k % config.block_k):
            with pytest.raises(ValueError):  # a GEMV tile that does not divide the weight: the tuner skips it
                matmul(x, weight, b, config)
            continue
        out = matmul(x, weight, b, config)
        assert out.shape == (rows, n) and out.dtype == dtype
        torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2, msg=lambda m, c=config: f"{c}: {m}")


def test_no_rows():
    from gptserve.kernels.matmul import matmul
    from gptserve.kernels.matmul_configs import MatmulConfig

    device = torch.device("cuda")
    weight = torch.randn(64, 32, device=device).to(torch.float16)
    x = torch.empty(0, 32, device=device, dtype=torch.float16)
    assert matmul(x, weight, None, MatmulConfig(16, 64, 64, 4)).shape == (0, 64)
