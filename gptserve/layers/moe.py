"""Sparse mixture-of-experts MLP (Mixtral, Qwen3-MoE): a replicated router picks `top_k` of `num_experts`
SwiGLU experts per token, and the token's output is the routing-weighted sum of those experts' outputs.

Routing follows transformers: softmax over the router logits in float32, the `top_k` largest, optionally
renormalised to sum to one over the chosen experts (Mixtral always; Qwen3-MoE per `norm_topk_prob`).

`FusedMoE` holds every expert's weights stacked, `gate_up_proj` [E, 2 * inner, hidden] (gate rows, then
up rows) and `down_proj` [E, hidden, inner], and computes each expert only on the tokens routed to it:
the (token, choice) pairs are sorted by expert and each expert that received tokens runs two GEMMs over
its group. While a CUDA graph is being captured, where the group sizes cannot be read on the host, every
expert runs on every token and unchosen experts get weight zero (`moe_reference`, the same result).

Under tensor parallelism each expert is split Megatron-style: its gate and up rows column-wise, its down
projection row-wise, so a rank holds `inner / world` features of every expert and the block's partial
outputs are summed with one all-reduce. The router is replicated, so every rank routes identically.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gptserve.layers.activation import ActAndMul
from gptserve.layers.linear import Linear, uninitialized
from gptserve.layers.parallel_linear import divide
from gptserve.parallel import parallel_state


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, top_k] float32, expert ids [T, top_k]) from router logits [T, num_experts]."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def grouped_experts(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    act_fn: ActAndMul,
) -> torch.Tensor:
    """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]), each expert run once over the tokens routed to it."""
    num_tokens, top_k = ids.shape
    flat_ids = ids.reshape(-1)
    order = flat_ids.argsort(stable=True)  # (token, choice) pairs grouped by expert
    counts = torch.bincount(flat_ids, minlength=gate_up.shape[0]).tolist()
    outputs = x.new_empty(num_tokens * top_k, down.shape[1])
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start : start + count]
        start += count
        outputs[pairs] = F.linear(act_fn(F.linear(x[pairs // top_k], gate_up[expert])), down[expert])
    mixed = (outputs.view(num_tokens, top_k, -1).float() * weights[..., None]).sum(dim=1)
    return mixed.to(x.dtype)


def moe_reference(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    act_fn: ActAndMul,
) -> torch.Tensor:
    """`grouped_experts` computed densely: every expert on every token, weighted by its routing weight
    (zero where the token did not choose it). The reference in tests, and the path a captured CUDA graph
    takes (no host-side group sizes)."""
    dense = torch.zeros(ids.shape[0], gate_up.shape[0], dtype=torch.float32, device=x.device)
    dense.scatter_(1, ids, weights.float())
    out = torch.zeros(x.shape[0], down.shape[1], dtype=torch.float32, device=x.device)
    for expert in range(gate_up.shape[0]):
        y = F.linear(act_fn(F.linear(x, gate_up[expert])), down[expert])
        out += dense[:, expert : expert + 1] * y.float()
    return out.to(x.dtype)


class FusedMoE(nn.Module):
    """Every expert's SwiGLU weights stacked (this rank's inner features of each); forward(x, router_logits)
    routes, runs the chosen experts and sums the ranks' partial outputs."""

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        renormalize: bool,
        activation: str = "silu",
    ):
        super().__init__()
        inner = divide(intermediate_size, "expert intermediate size")
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * inner, hidden_size), requires_grad=False
        )
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, inner), requires_grad=False)
        self.act_fn = ActAndMul(activation)

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        weights, ids = route(router_logits, self.top_k, self.renormalize)
        experts = moe_reference if x.is_cuda and torch.cuda.is_current_stream_capturing() else grouped_experts
        y = experts(x, self.gate_up_proj, self.down_proj, weights, ids, self.act_fn)
        return parallel_state.all_reduce(y) if parallel_state.world_size() > 1 else y

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k={self.top_k}, renormalize={self.renormalize}"


class SparseMoeBlock(nn.Module):
    """The router (`gate`, hidden -> num_experts, replicated) and the experts, named as the checkpoints
    name them (`<block>.gate`, `<block>.experts.N....`)."""

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        renormalize: bool,
        activation: str = "silu",
    ):
        super().__init__()
        self.gate = uninitialized(Linear, hidden_size, num_experts, bias=False)
        self.experts = FusedMoE(num_experts, top_k, hidden_size, intermediate_size, renormalize, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(x, self.gate(x))
