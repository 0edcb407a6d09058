"""The grouped MoE Triton kernel against its plain-PyTorch reference and the layer's grouped experts, on
fresh random inputs: prefill and decode sizes, routings that leave experts empty or pile onto one,
float32 and bfloat16 (GPU only)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

TOLERANCE = {torch.float32: 2e-2, torch.bfloat16: 3e-2}  # tl.dot rounds float32 inputs to tf32


@pytest.mark.parametrize(
    "tokens,experts,top_k,hidden,inner,dtype,skew",
    [
        (48, 8, 2, 64, 32, torch.float32, False),
        (3, 8, 2, 64, 32, torch.bfloat16, False),  # decode-sized: most experts empty
        (200, 8, 2, 256, 96, torch.bfloat16, True),  # inner not a multiple of the tile
        (37, 16, 4, 128, 64, torch.float32, True),
    ],
)
def test_fused_moe_matches_reference(tokens, experts, top_k, hidden, inner, dtype, skew):
    from gptserve.kernels.fused_moe import fused_moe, fused_moe_reference
    from gptserve.layers.activation import SiluAndMul
    from gptserve.layers.moe import grouped_experts, route

    torch.manual_seed(torch.randint(0, 2**31, ()).item())
    device = torch.device("cuda")
    x = torch.randn(tokens, hidden, device=device).to(dtype)
    gate_up = (torch.randn(experts, 2 * inner, hidden, device=device) * hidden**-0.5).to(dtype)
    down = (torch.randn(experts, hidden, inner, device=device) * inner**-0.5).to(dtype)
    logits = torch.randn(tokens, experts, device=device)
    if skew:
        logits[:, 1] += 10.0
    weights, ids = route(logits, top_k, renormalize=True)
    act = SiluAndMul()
    expected = fused_moe_reference(x, gate_up, down, weights, ids, act)
    actual = fused_moe(x, gate_up, down, weights, ids, act)
    scale = expected.float().abs().max().item()
    assert (actual.float() - expected.float()).abs().max().item() <= TOLERANCE[dtype] * scale
    grouped = grouped_experts(x, gate_up, down, weights, ids, act)
    assert (actual.float() - grouped.float()).abs().max().item() <= TOLERANCE[dtype] * scale
