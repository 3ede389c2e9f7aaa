// Kernel selection for the grouped GEMMs (the C++ side of the Python kernel-config objects).
#pragma once

namespace fusedmoe {

// Which CUDA kernel and tile a family of grouped GEMMs runs with; zero fields leave the choice to the
// shipped heuristic. The CPU backend ignores it. A choice the device or the problem cannot run (wgmma off
// sm_90, rows not 16-byte aligned) is an error, not a silent fallback.
enum class GemmKernel : int { automatic = 0, wgmma = 1, portable = 2 };
struct GemmTiling {
  GemmKernel kernel = GemmKernel::automatic;
  int block_n = 0;    // wgmma output tile width, 128 or 256 (0: 256 where the output is that wide)
  int cluster_m = 0;  // wgmma forward / dX: 2 = CTA pairs share each weight tile by TMA multicast (0 or 1: not)
};

}  // namespace fusedmoe
