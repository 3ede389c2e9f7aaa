"""Kernel configurations: which CUDA kernel and tile each family of grouped GEMMs runs with.

Three families: the forward GEMMs (GEMM1 with the token gather and SiLU·mul, GEMM2 with the slot
scatter), the dX GEMMs (dA = dOut·W2, dx = dY1·W1) and the dW GEMMs (dW1, dW2). A config object passed
to the block or to `grouped_gemm` selects its family's kernel explicitly; `None` leaves the family to
the shipped heuristic (or to the autotuner's cached choice where autotune=True).

The CUDA backend implements these tiles (BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K, num_stages, num_warps):
- (128, 256, 64, 4, 12) and (128, 128, 64, 6, 12): the Hopper wgmma kernel (sm_90) with one producer and
  two consumer warpgroups; the heuristic takes the 256-wide tile where the output is at least 256 wide.
  `cluster_m=2` (forward and dX only) runs CTA pairs on neighbouring m-tiles that share each weight tile
  by TMA multicast; the heuristic pairs them where the experts average at least 128 routed rows.
- (128, 128, 32, 4, 8): the portable mma.sync kernel (any sm_80+ GPU).
A config the device or the problem cannot run (wgmma off sm_90, rows that are not 16-byte multiples) is
an error at the call, not a silent fallback. The CPU backend ignores the choice.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

WGMMA_TILES = ((128, 256, 64, 4, 12), (128, 128, 64, 6, 12))
PORTABLE_TILE = (128, 128, 32, 4, 8)
SUPPORTED_TILES = WGMMA_TILES + (PORTABLE_TILE,)

# Kernel codes of the C++ GemmTiling (fusedmoe/tiling.hpp).
_WGMMA, _PORTABLE = 1, 2


@dataclass(frozen=True)
class _KernelConfig:
    BLOCK_SIZE_M: int = 128
    BLOCK_SIZE_N: int = 256
    BLOCK_SIZE_K: int = 64
    num_stages: int = 4
    num_warps: int = 12
    cluster_m: int = 1

    # Whether the family's GEMMs share a weight tile across m-tiles (forward, dX), so CTA pairs can multicast it.
    _multicast = True

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{type(self).__name__}.{f.name} must be a positive int, got {v!r}")
        tile = self.tile()
        if tile not in SUPPORTED_TILES:
            raise ValueError(f"{type(self).__name__}{tile} is not implemented by the CUDA backend; supported "
                             f"(BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K, num_stages, num_warps): {SUPPORTED_TILES}")
        max_cluster = 2 if self._multicast and tile != PORTABLE_TILE else 1
        if self.cluster_m > max_cluster:
            why = "the portable kernel" if tile == PORTABLE_TILE else "the dW GEMMs (no weight tile to share)"
            raise ValueError(f"{type(self).__name__}.cluster_m must be 1 for {why}, got {self.cluster_m}")

    def tile(self):
        return (self.BLOCK_SIZE_M, self.BLOCK_SIZE_N, self.BLOCK_SIZE_K, self.num_stages, self.num_warps)

    def tiling(self) -> list:
        """The C++ GemmTiling fields: [kernel, block_n, cluster_m]."""
        if self.tile() == PORTABLE_TILE:
            return [_PORTABLE, 128, 1]
        return [_WGMMA, self.BLOCK_SIZE_N, self.cluster_m]

    @classmethod
    def from_tiling(cls, tiling):
        """The config of a [kernel, block_n, cluster_m] triple (the autotune cache's form)."""
        kernel, block_n, cluster_m = (int(v) for v in tiling)
        if kernel == _PORTABLE:
            return cls(*PORTABLE_TILE)
        if kernel != _WGMMA:
            raise ValueError(f"{cls.__name__}: unknown kernel code {kernel} in {list(tiling)}")
        tile = next((t for t in WGMMA_TILES if t[1] == block_n), None)
        if tile is None:
            raise ValueError(f"{cls.__name__}: no wgmma tile {block_n} wide; have {[t[1] for t in WGMMA_TILES]}")
        return cls(*tile, cluster_m=cluster_m)

    @classmethod
    def search_space(cls) -> list:
        """The wgmma choices the autotuner times for this family."""
        clusters = (1, 2) if cls._multicast else (1,)
        return [cls(*t, cluster_m=c) for t in WGMMA_TILES for c in clusters]


class KernelConfigForward(_KernelConfig):
    """Tiles of the forward grouped GEMMs (gather of x in the loads, scatter to slots in the stores)."""


class KernelConfigBackward_dX(_KernelConfig):
    """Tiles of the dX grouped GEMMs (dOut·W2 and dY1·W1)."""


class KernelConfigBackward_dW(_KernelConfig):
    """Tiles of the dW grouped GEMMs (a variable-length reduction over each expert's rows)."""

    _multicast = False


FAMILIES = (("fwd", KernelConfigForward), ("bwd_dX", KernelConfigBackward_dX), ("bwd_dW", KernelConfigBackward_dW))


def check_config(value, cls, name: str):
    if value is not None and not isinstance(value, cls):
        raise TypeError(f"fusedmoe: {name} must be a {cls.__name__} or None, got {type(value).__name__}")
    return value


def kernels_arg(fwd=None, bwd_dX=None, bwd_dW=None) -> list:
    """The ops' `kernels` argument: [] (all heuristic) or 9 ints, [0, 0, 0] for a family left to the heuristic."""
    if fwd is None and bwd_dX is None and bwd_dW is None:
        return []
    out = []
    for c in (fwd, bwd_dX, bwd_dW):
        out += c.tiling() if c is not None else [0, 0, 0]
    return out
