"""Per-expert checkpoint tensors into `FusedMoE`'s stacked weights.

Checkpoints store each expert's projections apart: Mixtral `<block>.experts.N.w1|w3|w2.weight` (gate, up,
down), Qwen3-MoE `<block>.experts.N.gate_proj|up_proj|down_proj.weight`. Expert N's gate rows go to
`gate_up_proj[N, :inner]`, its up rows to `gate_up_proj[N, inner:]` and its down weight to `down_proj[N]`.
Every (layer, expert, part) must arrive; what does not is named in the `ModelLoadError`, with the name
the checkpoint should have used.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from gptserve.errors import ModelLoadError
from gptserve.layers.moe import FusedMoE

_EXPERT = re.compile(r"^(?P<block>.+)\.experts\.(?P<expert>\d+)\.(?P<part>\w+)\.weight$")


class ExpertWeightLoader:
    """Takes the per-expert tensors out of a `(hf_name, tensor)` stream and copies them into the stacked
    weights of `model`'s `FusedMoE` modules; `parts` maps the checkpoint's names of gate, up and down."""

    def __init__(self, model: nn.Module, gate: str, up: str, down: str):
        self.model_name = type(model).__name__
        self.parts = {gate: "gate", up: "up", down: "down"}
        self.names = (gate, up, down)
        self.experts = {
            name.removesuffix(".experts"): module
            for name, module in model.named_modules()
            if isinstance(module, FusedMoE)
        }
        self.missing = {
            (block, expert, part)
            for block, module in self.experts.items()
            for expert in range(module.num_experts)
            for part in self.names
        }

    def stacked_parameters(self) -> frozenset[str]:
        """The stacked parameters' names, which this loader fills instead of `load_hf_weights`."""
        return frozenset(
            f"{block}.experts.{leaf}" for block in self.experts for leaf in ("gate_up_proj", "down_proj")
        )

    def others(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """`weights` without the expert tensors, which are copied on the way."""
        with torch.no_grad():
            for name, tensor in weights:
                match = _EXPERT.match(name)
                if match is None or match["block"] not in self.experts or match["part"] not in self.parts:
                    yield name, tensor
                    continue
                self._copy(name, match["block"], int(match["expert"]), match["part"], tensor)

    def check_complete(self) -> None:
        if not self.missing:
            return
        names = sorted(f"{block}.experts.{expert}.{part}.weight" for block, expert, part in self.missing)
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise ModelLoadError(f"checkpoint lacks {len(names)} weight(s) of {self.model_name}: {shown}")

    def _copy(self, name: str, block: str, expert: int, part: str, tensor: torch.Tensor) -> None:
        module = self.experts[block]
        if expert >= module.num_experts:
            raise ModelLoadError(
                f"unexpected weight {name!r}: {self.model_name} has {module.num_experts} experts per layer"
            )
        inner = module.down_proj.shape[2]
        kind = self.parts[part]
        if kind == "down":
            dst = module.down_proj[expert]
        else:
            dst = module.gate_up_proj[expert].narrow(0, 0 if kind == "gate" else inner, inner)
        if tuple(tensor.shape) != tuple(dst.shape):
            raise ModelLoadError(
                f"weight {name!r} has shape {tuple(tensor.shape)}, "
                f"{self.model_name} expects {tuple(dst.shape)}"
            )
        dst.copy_(tensor)
        self.missing.discard((block, expert, part))
