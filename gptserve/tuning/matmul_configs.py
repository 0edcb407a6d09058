"""Launch configurations of the Triton matrix product (`gptserve.kernels.matmul`) that `gptserve tune`
times for each GEMM, and the one a tuning report names. Kept apart from the kernel so that reading a
report needs no Triton."""

from __future__ import annotations

from dataclasses import asdict, dataclass

# (BLOCK_M, BLOCK_N, warps) of the tiles for prompt-sized row counts, bound by arithmetic: the Triton
# product's candidates here and the int8 weight-only kernel's autotuning set.
LARGE_TILES = ((64, 128, 4), (128, 128, 8), (128, 256, 8), (64, 256, 8))


@dataclass(frozen=True)
class MatmulConfig:
    """One launch configuration: the tile, the inner-dimension split, warps and pipeline stages."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def candidate_configs(rows: int) -> list[MatmulConfig]:
    """The configurations tried for a GEMM of `rows` rows: split-K tiles for decode-sized row counts,
    large tiles for prompt-sized ones."""
    if rows <= 64:
        block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
        return [
            MatmulConfig(block_m, n, k, split) for n in (64, 128) for k in (64, 128) for split in (1, 2, 4, 8)
        ]
    return [MatmulConfig(m, n, 64, 1, warps, stages) for m, n, warps in LARGE_TILES for stages in (3, 4)]
