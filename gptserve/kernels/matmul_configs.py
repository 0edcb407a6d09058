"""Launch configurations of the Triton matrix products (`gptserve.kernels.matmul`, `gemv`, `int8_matmul`):
the candidates `gptserve tune` times for each GEMM, the one-row GEMV's default tile, and the one a tuning
report names. Plain Python, kept apart from the kernels so that reading a report needs no Triton."""

from __future__ import annotations

from dataclasses import asdict, dataclass

# (BLOCK_M, BLOCK_N, warps) of the tiles for prompt-sized row counts, bound by arithmetic: the Triton
# product's candidates here and the int8 weight-only kernel's autotuning set.
LARGE_TILES = ((64, 128, 4), (128, 128, 8), (128, 256, 8), (64, 256, 8))


# (BLOCK_N, BLOCK_K) of the one-row GEMV (`gptserve.kernels.gemv`), the first that divides a weight
# being its default: on an H100, 4 x 2048 tiles read every GPT-J-6B weight fastest of 4-32 rows by
# 256-2048 columns (2.9-3.1 TB/s, 4 warps).
GEMV_TILES = ((4, 2048), (4, 1024), (4, 512), (4, 256), (2, 2048), (2, 1024))


@dataclass(frozen=True)
class MatmulConfig:
    """One launch configuration: the tile, the inner-dimension split, warps and pipeline stages.
    `block_m == 1` names the one-row GEMV kernel instead of the tiled product (no split)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def default_gemv_config(n: int, k: int) -> MatmulConfig | None:
    """The one-row GEMV tile for a weight [n, k]: the first of `GEMV_TILES` that divides it, or None."""
    for block_n, block_k in GEMV_TILES:
        if n % block_n == 0 and k % block_k == 0:
            return MatmulConfig(1, block_n, block_k, 1, 4, 3)
    return None


def candidate_configs(rows: int) -> list[MatmulConfig]:
    """The configurations tried for a GEMM of `rows` rows: for one row the GEMV kernel's tiles too,
    split-K tiles for decode-sized row counts, large tiles for prompt-sized ones."""
    if rows == 1:
        gemv = [MatmulConfig(1, n, k, 1, w, 3) for n in (2, 4, 8) for k in (1024, 2048) for w in (4, 8)]
        return gemv + candidate_configs(2)
    if rows <= 64:
        block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
        return [
            MatmulConfig(block_m, n, k, split) for n in (64, 128) for k in (64, 128) for split in (1, 2, 4, 8)
        ]
    return [MatmulConfig(m, n, 64, 1, warps, stages) for m, n, warps in LARGE_TILES for stages in (3, 4)]
