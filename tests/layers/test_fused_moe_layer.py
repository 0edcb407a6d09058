"""The MoE layer's routing and its grouped expert computation against the dense reference, on fresh
random inputs, with routings that leave experts empty or send every token to one expert."""

from __future__ import annotations

import pytest
import torch

from gptserve.layers.activation import SiluAndMul
from gptserve.layers.moe import grouped_experts, moe_reference, route

EXPERTS, HIDDEN, INNER = 8, 64, 32


def random_experts(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    gate_up = torch.randn(EXPERTS, 2 * INNER, HIDDEN, generator=g) * 0.2
    down = torch.randn(EXPERTS, HIDDEN, INNER, generator=g) * 0.2
    return gate_up, down


def test_route_softmax_topk_and_renormalisation():
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.0], [5.0, 0.0, 0.0, 4.0]])
    probs = torch.softmax(logits, -1)
    weights, ids = route(logits, 2, renormalize=False)
    assert ids.tolist() == [[2, 3], [0, 3]]
    assert torch.allclose(weights, probs.gather(1, ids))
    renormalised, same_ids = route(logits.half(), 2, renormalize=True)
    assert renormalised.dtype == torch.float32 and same_ids.tolist() == ids.tolist()
    assert torch.allclose(renormalised.sum(-1), torch.ones(2))


@pytest.mark.parametrize(
    "tokens,skew", [(48, "random"), (3, "random"), (20, "two-experts"), (5, "one-expert")]
)
def test_grouped_experts_match_dense_reference(tokens, skew):
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    gate_up, down = random_experts(g)
    x = torch.randn(tokens, HIDDEN, generator=g)
    logits = torch.randn(tokens, EXPERTS, generator=g)
    if skew == "two-experts":
        logits[:, 3] += 20.0
        logits[:, 6] += 10.0
    elif skew == "one-expert":
        logits[:, 5] += 20.0
    weights, ids = route(logits, 2, renormalize=skew != "one-expert")
    counts = torch.bincount(ids.flatten(), minlength=EXPERTS)
    if skew != "random" or tokens == 3:
        assert (counts == 0).any()  # some experts receive no token
    act = SiluAndMul()
    expected = moe_reference(x, gate_up, down, weights, ids, act)
    actual = grouped_experts(x, gate_up, down, weights, ids, act)
    assert (actual - expected).abs().max().item() < 1e-5
    # and the plain definition, token by token
    for t in range(tokens):
        y = sum(
            w * (act(gate_up[e] @ x[t]) @ down[e].T) for w, e in zip(weights[t].tolist(), ids[t].tolist())
        )
        assert (actual[t] - y).abs().max().item() < 1e-5
