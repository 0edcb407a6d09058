"""Model parameters come from checkpoints: a model's layers are built uninitialised
(`gptserve.layers.linear.uninitialized`) and filled here by Hugging Face name.

Model classes mirror the Hugging Face module tree, so a checkpoint tensor lands on the parameter of the
same name. The exceptions are packed projections that one GEMM computes (q|k|v, gate|up): `packed` maps
each packed module to its Hugging Face parts and their row counts, in order, e.g.
`{"qkv_proj": {"q_proj": 512, "k_proj": 128, "v_proj": 128}}`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from gptserve.errors import ModelLoadError

Packed = dict[str, dict[str, int]]


def load_hf_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    packed: Packed | None = None,
    ignore: tuple[str, ...] = (),
    loaded_elsewhere: frozenset[str] = frozenset(),
) -> None:
    """Copy `(hf_name, tensor)` pairs into `model`, casting to each parameter's dtype and device.

    Names ending with one of `ignore` are skipped (buffers older checkpoints carry, tied heads). Raises
    `ModelLoadError` naming the tensor on an unknown name or a shape mismatch, and naming what is missing
    once `weights` is exhausted. Parameters named in `loaded_elsewhere` (stacked expert weights a model
    fills from per-expert tensors) are not required here: that model checks them itself.
    """
    params = dict(model.named_parameters())
    packed = packed or {}
    parts: dict[str, tuple[str, int, int]] = {}  # HF part -> (packed module, row offset, rows)
    for packed_name, sizes in packed.items():
        offset = 0
        for part, rows in sizes.items():
            parts[part] = (packed_name, offset, rows)
            offset += rows
    missing: set[tuple[str, str | None]] = set()  # (parameter, part of a packed one or None)
    for name in params:
        if name in loaded_elsewhere:
            continue
        short = _module_name(name)
        if short in packed:
            missing.update((name, part) for part in packed[short])
        else:
            missing.add((name, None))

    with torch.no_grad():
        for name, tensor in weights:
            if name.endswith(ignore):
                continue
            module, leaf = _split(name)
            parent, short = _split(module)
            target, part = name, None
            if short in parts:
                packed_name, offset, rows = parts[short]
                target, part = _join(parent, packed_name, leaf), short
            param = params.get(target)
            if param is None:
                raise ModelLoadError(
                    f"unexpected weight {name!r}: {type(model).__name__} has no such parameter"
                )
            dst = param if part is None else param.narrow(0, offset, rows)
            if tuple(tensor.shape) != tuple(dst.shape):
                raise ModelLoadError(
                    f"weight {name!r} has shape {tuple(tensor.shape)}, {type(model).__name__} expects "
                    f"{tuple(dst.shape)}"
                )
            dst.copy_(tensor)
            if part is None and short in packed:  # already packed, as in our own state dict
                missing.difference_update((target, p) for p in packed[short])
            missing.discard((target, part))

    if missing:
        names = sorted(name if part is None else _part_name(name, part) for name, part in missing)
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise ModelLoadError(f"checkpoint lacks {len(names)} weight(s) of {type(model).__name__}: {shown}")


def _split(name: str) -> tuple[str, str]:
    head, _, tail = name.rpartition(".")
    return head, tail


def _module_name(param: str) -> str:
    """`a.b.qkv_proj.weight` -> `qkv_proj`."""
    return _split(_split(param)[0])[1]


def _join(*pieces: str) -> str:
    return ".".join(p for p in pieces if p)


def _part_name(packed_param: str, part: str) -> str:
    """`a.qkv_proj.weight` + `k_proj` -> `a.k_proj.weight`, the name the checkpoint should have used."""
    module, leaf = _split(packed_param)
    parent, _ = _split(module)
    return _join(parent, part, leaf)
