"""Weight-only quantized linear layers: int8 per output channel, int4 in groups of 32 along the input.

Activations stay in bf16/fp16; the weights are stored compact and expanded inside the matmul, which
is what makes decoding fast when it is bound by reading weights. On CPU the layers call PyTorch's
fused weight-only kernels, on CUDA int8 runs the Triton kernel of `gptserve.kernels.int8_matmul`;
elsewhere they dequantize and call `F.linear` (the reference path).

A layer may also keep its dense weight: PyTorch's CPU weight-only kernels win only for a handful of
rows (decoding one or a few sequences), while prefill and large decode batches are compute-bound and
run faster as a dense GEMM. With `dense` set, calls with more than `small_batch` rows use it. The compact
kernels cost about one pass over the weights per row, the dense GEMM one pass over bf16 weights for all
rows, so the crossover grows with the compression: measured in decode steps of the 135M model on CPU
(weights cold in cache), int4 layers win up to about 16 rows, the int8 head up to about 4.

Int4 is asymmetric: w = scale * (q - 8) + zero with q in [0, 15], one (scale, zero) per group, which
represents a GGUF Q4_1 block exactly (scale = d, zero = m + 8d).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gptserve.kernels.int8_weights import quantize_per_channel
from gptserve.layers.linear import LinearLayer

INT4_GROUP = 32


class WeightOnlyLinear(LinearLayer):
    """Shared dispatch: compact kernel for few rows, dense GEMM (if kept) for many."""

    dense: torch.Tensor | None
    bias: nn.Parameter | None
    small_batch: int  # most rows a call may have and still take the compact kernel when `dense` is kept

    def _compact(self, flat: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _dense_serves(self, x: torch.Tensor) -> bool:
        return self.dense is not None and x.numel() // x.shape[-1] > self.small_batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._dense_serves(x):  # the bias inside the GEMM
            return F.linear(x, self.dense, self.bias)
        y = self.product(x)
        return y if self.bias is None else y + self.bias

    def product(self, x: torch.Tensor) -> torch.Tensor:
        if self._dense_serves(x):
            return F.linear(x, self.dense)
        flat = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        y = self._compact(flat)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], -1)


class Int8Linear(WeightOnlyLinear):
    """y = x @ (w_int8 * scale)^T + bias, with one scale per output channel."""

    small_batch = 4

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight)  # [N, K] int8
        self.register_buffer("scale", scale)  # [N], activation dtype
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.dense = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        q, scale = quantize_per_channel(linear.weight)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(q, scale, bias)

    def dequantized(self) -> torch.Tensor:
        return self.weight.to(self.scale.dtype) * self.scale[:, None]

    def _compact(self, flat: torch.Tensor) -> torch.Tensor:
        if flat.is_cpu:
            return torch._weight_int8pack_mm(flat, self.weight, self.scale)
        if flat.is_cuda and flat.dtype in (torch.float16, torch.bfloat16):
            from gptserve.kernels.int8_matmul import int8_matmul

            return int8_matmul(flat, self.weight, self.scale)
        return F.linear(flat, self.weight.to(flat.dtype)) * self.scale


class Int4Linear(WeightOnlyLinear):
    """Group-wise asymmetric 4-bit weights (groups of 32 input channels)."""

    small_batch = 16

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        n, k = q.shape
        self.out_features, self.in_features = n, k
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.dense = None
        # scales_and_zeros: [K / group, N, 2] in the activation dtype, the layout the CPU kernel takes.
        self.register_buffer("scales_and_zeros", torch.stack([scale.T, zero.T], dim=-1).contiguous())
        if q.is_cpu:
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 1))
        else:
            self.register_buffer("packed", q.to(torch.uint8))

    @staticmethod
    def supports(linear: nn.Linear) -> bool:
        n, k = linear.weight.shape
        return k % INT4_GROUP == 0 and n % 16 == 0

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int4Linear:
        w = linear.weight.detach().float()
        n, k = w.shape
        groups = w.view(n, k // INT4_GROUP, INT4_GROUP)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        scale = ((high - low) / 15.0).clamp(min=1e-10)
        q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).view(n, k)
        zero = low + 8.0 * scale
        bias = None if linear.bias is None else linear.bias.detach()
        dtype = linear.weight.dtype
        return cls(q, scale.to(dtype), zero.to(dtype), bias)

    def dequantized(self) -> torch.Tensor:
        """[N, K] weights in the activation dtype (for the reference path and tests)."""
        eye = torch.eye(self.in_features, dtype=self.scales_and_zeros.dtype, device=self.packed.device)
        if self.packed.is_cpu:
            return self._cpu_mm(eye).T.contiguous()
        q = self.packed.to(self.scales_and_zeros.dtype)
        scale = self.scales_and_zeros[..., 0].T.repeat_interleave(INT4_GROUP, dim=1)
        zero = self.scales_and_zeros[..., 1].T.repeat_interleave(INT4_GROUP, dim=1)
        return (q - 8) * scale + zero

    def _cpu_mm(self, flat: torch.Tensor) -> torch.Tensor:
        # The torch.* binding costs a microsecond less per call than torch.ops.aten (four calls a layer).
        return torch._weight_int4pack_mm_for_cpu(flat, self.packed, INT4_GROUP, self.scales_and_zeros)

    def _compact(self, flat: torch.Tensor) -> torch.Tensor:
        return self._cpu_mm(flat) if flat.is_cpu else F.linear(flat, self.dequantized())


def quantize_linears(
    model: nn.Module, layers: str | None, head: str | None, keep_dense: bool = False
) -> dict[str, int]:
    """Swap every `nn.Linear` for its quantized form: `layers` for the transformer blocks, `head` for
    `lm_head` ("int8", "int4" or None to keep). `keep_dense` keeps the dense weight for many-row calls.
    Returns how many layers got each format."""
    kinds = {"int8": Int8Linear, "int4": Int4Linear}
    counts: dict[str, int] = {}
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            kind = head if name == "lm_head" else layers
            if kind is None:
                continue
            if kind == "int4" and not Int4Linear.supports(child):
                kind = "int8"  # shapes the int4 kernel cannot take keep 8 bits
            quantized = kinds[kind].from_linear(child)
            if keep_dense:
                quantized.dense = child.weight.detach()
            wrap = getattr(child, "wrap_quantized", None)  # a tensor-parallel layer keeps its collective
            if wrap is not None:
                quantized = wrap(quantized)
            setattr(module, name, quantized)
            counts[kind] = counts.get(kind, 0) + 1
    return counts
