"""Rotary position embedding (RoPE): frequency tables, their scaling variants and the two rotation layouts.

One `RotaryEmbedding` per model holds a float32 [max_positions, rotary_dim] table of cos | sin, looked up
by each token's absolute position, so the packed batch may mix sequences at any offsets. Only the first
`rotary_dim` channels of every head rotate (partial rotary, as GPT-J and GPT-NeoX use); the rest pass through.

A model looks the step's positions up once (`cos_sin`) and hands the result to every layer's `rotate_`,
which turns all heads of its input in place, q and k together where they sit side by side in the fused
qkv projection: x * cos + swap(x) * signed_sin, with swap exchanging each channel and its rotation partner
and the sign of sin folded into the table. Decoding is bound by per-op overhead, so a rotation is four
elementwise ops whatever the head count, and partial rotary needs no re-assembly.

LongRoPE (Phi-3) keeps a short-factor and a long-factor table, both scaled by its attention factor; a forward
pass whose highest position reaches the original length uses the long one for every token, as transformers
does for a sequence of that length. In the engine that choice is per step: a sequence's keys cached before
it crossed the original length keep their short-factor rotation (transformers recomputes them), and a
shorter sequence in a step with a longer one is rotated with the long table too.

Layouts: "rotate half" (GPT-NeoX, Llama) pairs channel i with i + rotary_dim/2; "interleaved" (GPT-J,
mesh-transformer-jax's rotate_every_two) pairs channels 2i and 2i+1.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import nn

from gptserve.config import ModelConfig
from gptserve.errors import ModelLoadError

SUPPORTED_SCALING = ("linear", "dynamic", "llama3", "longrope")


class Rope(NamedTuple):
    """One forward pass's rotation tables: cos [T, 1, rotary_dim], and sin with its sign folded in,
    shaped like the swapped channel pairs it multiplies ([T, 1, 2, rotary_dim/2] for rotate-half,
    [T, 1, rotary_dim/2, 2] for interleaved)."""

    cos: torch.Tensor
    sin: torch.Tensor


def base_inv_freq(rotary_dim: int, base: float | torch.Tensor) -> torch.Tensor:
    """Unscaled RoPE frequencies base^(-2i/d) in float32: [rotary_dim/2], or [P, rotary_dim/2] for P bases."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    if isinstance(base, torch.Tensor):
        base = base[:, None]
    return 1.0 / (base**exponents)


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: slow the low frequencies by `factor`, keep the high ones, blend smoothly in between."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, blended, scaled)


def dynamic_ntk_bases(
    base: float, rotary_dim: int, factor: float, max_trained: int, num_positions: int
) -> torch.Tensor:
    """Dynamic NTK: a token at position p uses the base stretched for a sequence of max(p+1, max_trained).

    Tying the base to the token's own position (not to the longest sequence in the batch) keeps the output
    independent of the batch; it equals the Hugging Face reference when tokens arrive one at a time.
    """
    seq_len = torch.arange(1, num_positions + 1, dtype=torch.int64).clamp(min=max_trained).float()
    return base * ((factor * seq_len / max_trained) - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))


def longrope_attention_factor(scaling: dict[str, Any], max_positions: int) -> float:
    """LongRoPE's (Phi-3's) scale on cos and sin: the config's `attention_factor`, else
    sqrt(1 + ln(factor) / ln(original length)) with factor = max_positions / original length by default."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or max_positions / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def longrope_table(rotary_dim: int, max_positions: int, base: float, factors: list[float], scale: float):
    """cos | sin of LongRoPE frequencies base^(-2i/d) / factors[i], both times `scale`."""
    inv_freq = base_inv_freq(rotary_dim, base) / torch.tensor(factors, dtype=torch.float32)
    freqs = torch.arange(max_positions, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos() * scale, freqs.sin() * scale), dim=-1)


def rotary_table(
    rotary_dim: int, max_positions: int, base: float, scaling: dict[str, Any] | None
) -> torch.Tensor:
    """float32 [positions, rotary_dim] table of cos | sin; linear and dynamic scaling extend its length.
    LongRoPE's is its short-factor table (`RotaryEmbedding` also keeps the long one)."""
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    if kind not in ("default", *SUPPORTED_SCALING):
        raise ModelLoadError(f"rope_scaling type {kind!r} is not supported (supported: {SUPPORTED_SCALING})")
    if kind == "longrope":
        scale = longrope_attention_factor(scaling, max_positions)
        return longrope_table(rotary_dim, max_positions, base, scaling["short_factor"], scale)
    num_positions = int(max_positions * scaling["factor"]) if kind in ("linear", "dynamic") else max_positions
    positions = torch.arange(num_positions, dtype=torch.int64).float()[:, None]
    if kind == "dynamic":
        bases = dynamic_ntk_bases(base, rotary_dim, scaling["factor"], max_positions, num_positions)
        freqs = positions * base_inv_freq(rotary_dim, bases)
    else:
        inv_freq = base_inv_freq(rotary_dim, base)
        if kind == "linear":
            inv_freq = inv_freq / scaling["factor"]
        elif kind == "llama3":
            inv_freq = llama3_inv_freq(inv_freq, scaling)
        freqs = positions * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotates q and k of a packed batch by their absolute positions."""

    def __init__(
        self,
        head_dim: int,
        rotary_dim: int,
        max_positions: int,
        base: float = 10000.0,
        scaling: dict[str, Any] | None = None,
        interleaved: bool = False,
    ):
        super().__init__()
        if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
            raise ModelLoadError(f"rotary_dim={rotary_dim} must be even and in (0, head_dim={head_dim}]")
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        self.interleaved = interleaved
        table = rotary_table(rotary_dim, max_positions, base, scaling)
        self.max_positions = table.shape[0]
        # Non-persistent: derived from the config, never part of a checkpoint.
        self.register_buffer("cos_sin_cache", table, persistent=False)
        # LongRoPE: the long-factor table, used by a forward pass reaching past the original length.
        self.long_from: int | None = None
        self.register_buffer("long_cos_sin_cache", None, persistent=False)
        if (scaling or {}).get("rope_type") == "longrope":
            scale = longrope_attention_factor(scaling, max_positions)
            long = longrope_table(rotary_dim, max_positions, base, scaling["long_factor"], scale)
            self.long_from = scaling["original_max_position_embeddings"]
            self.register_buffer("long_cos_sin_cache", long, persistent=False)

    @classmethod
    def from_config(cls, config: ModelConfig, interleaved: bool = False) -> RotaryEmbedding:
        return cls(
            config.head_dim,
            config.rotary_dim or config.head_dim,
            config.max_position_embeddings,
            config.rope_theta,
            config.rope_scaling,
            interleaved,
        )

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> Rope:
        """The tables `rotate_` takes for tokens at `positions`, in `dtype`. They depend only on the
        positions, so one lookup serves every layer of a forward pass."""
        table = self.cos_sin_cache[positions]
        if self.long_cos_sin_cache is not None:
            table = self._longrope_choice(positions, table)
        # Cast before multiplying, as the reference does, so half-precision results round identically.
        cos, sin = table.to(dtype)[:, None, :].chunk(2, dim=-1)  # [T, 1, rot/2]
        if self.interleaved:  # channels 2i and 2i+1 share frequency i
            return Rope(cos.repeat_interleave(2, dim=-1), torch.stack((-sin, sin), dim=-1))
        return Rope(torch.cat((cos, cos), dim=-1), torch.stack((-sin, sin), dim=-2))

    def _longrope_choice(self, positions: torch.Tensor, short: torch.Tensor) -> torch.Tensor:
        """The long-factor rows for every token of a forward pass whose highest position reaches the
        original length, else the short ones: transformers' choice for a sequence of that length (decided
        on the device, so a captured CUDA graph keeps deciding)."""
        if positions.numel() == 0:
            return short
        use_long = positions.max() >= self.long_from
        return torch.where(use_long, self.long_cos_sin_cache[positions], short)

    def rotate_(self, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        """Rotate x [T, n*head_dim] (any number of heads; rows may be strided) in place; returns x."""
        num_tokens, rot = x.shape[0], self.rotary_dim
        heads = x.view(num_tokens, -1, self.head_dim)
        part = heads[..., :rot] if rot < self.head_dim else heads
        # swap: each pair (x1, x2) -> (x2, x1); times the signed sin it is (-x2 sin, x1 sin). Each product
        # rounds to the activation dtype before the sum, as in the reference.
        pairs = (rot // 2, 2) if self.interleaved else (2, rot // 2)
        swapped = part.unflatten(-1, pairs).flip(-1 if self.interleaved else -2)
        swapped.mul_(rope.sin)
        part.mul_(rope.cos)
        part.add_(swapped.view(part.shape))
        return x

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T], q [T, heads*head_dim], k [T, kv_heads*head_dim] -> rotated (q, k), same shapes."""
        rope = self.cos_sin(positions, q.dtype)
        return self.rotate_(q.clone(), rope), self.rotate_(k.clone(), rope)
