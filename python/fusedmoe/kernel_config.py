"""Kernel configurations: the tile shapes a backend's grouped GEMMs run with.

What the CUDA backend runs today is chosen by its shipped heuristic, per product: on sm_90 the wgmma
kernels with 128×256×64 tiles (4 stages) where the output is at least 256 wide, else 128×128×64
(6 stages), both with one producer and two consumer warpgroups; elsewhere (or with unaligned shapes) the
portable mma.sync kernel with 128×128×32 tiles, 4 stages and 8 warps. A config object is validated
against the portable kernel's shape below and recorded on the module, but does not yet select a kernel
(`FUSEDMOE_SM90_BN=128` in the environment forces 128-wide wgmma tiles); `None` means "the heuristic".
"""
from __future__ import annotations

from dataclasses import dataclass, fields

# (BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K, num_stages, num_warps) the CUDA backend implements.
SUPPORTED_TILES = ((128, 128, 32, 4, 8),)


@dataclass(frozen=True)
class _KernelConfig:
    BLOCK_SIZE_M: int = 128
    BLOCK_SIZE_N: int = 128
    BLOCK_SIZE_K: int = 32
    num_stages: int = 4
    num_warps: int = 8

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{type(self).__name__}.{f.name} must be a positive int, got {v!r}")
        tile = self.as_tuple()
        if tile not in SUPPORTED_TILES:
            raise ValueError(f"{type(self).__name__}{tile} is not implemented by the CUDA backend; supported "
                             f"(BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K, num_stages, num_warps): {SUPPORTED_TILES}")

    def as_tuple(self):
        return (self.BLOCK_SIZE_M, self.BLOCK_SIZE_N, self.BLOCK_SIZE_K, self.num_stages, self.num_warps)


class KernelConfigForward(_KernelConfig):
    """Tiles of the forward grouped GEMMs (gather of x in the loads, scatter to slots in the stores)."""


class KernelConfigBackward_dX(_KernelConfig):
    """Tiles of the dX grouped GEMMs (dOut·W2 and dY1·W1)."""


class KernelConfigBackward_dW(_KernelConfig):
    """Tiles of the dW grouped GEMMs (a variable-length reduction over each expert's rows)."""


def check_config(value, cls, name: str):
    if value is not None and not isinstance(value, cls):
        raise TypeError(f"fusedmoe: {name} must be a {cls.__name__} or None, got {type(value).__name__}")
    return value
