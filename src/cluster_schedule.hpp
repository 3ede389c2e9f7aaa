// The order in which the sm_90a grouped GEMM's CTA clusters take one group's output tiles (nt / nn with the weight
// tile multicast, kCluster 2 or 4): host and device code, so the CPU tests check the schedule the kernel runs.
#pragma once

#include <cstdint>

#include "numeric.hpp"  // FUSEDMOE_HD

namespace fusedmoe::detail {

// The tile width (BN) the sm_90a GEMM takes for N output columns unless told otherwise: 256 where N fills it, else 128.
// (Also the router's split-K choice, src/router_split.hpp, counts its column tiles with it.)
FUSEDMOE_HD int default_block_n(int64_t N) { return N >= 256 ? 256 : 128; }

// One CTA's tile of a work unit. n_tile >= the group's n-tile count: an empty tile (nothing stored; the CTA still
// steps through the k-tiles with its cluster).
struct ClusterTile {
  uint32_t m_tile, n_tile;
  bool multicast;  // the cluster shares this tile's weight tile (each CTA loads a part of it into all)
};

// Work units of a group of m_tiles × n_tiles output tiles for clusters of `cluster` CTAs: the group's whole sets of
// `cluster` neighbouring m-tiles × each n-tile (one unit each, the weight tile multicast), then its last
// m_tiles % cluster m-tiles × its n-tiles, `cluster` tiles per unit (each CTA with a weight tile of its own), so the
// tail does not idle the other CTAs for whole tiles. (With pairs that idling cost ~5% of tile slots at 1024 ± 32 rows
// per group and took back the 5–7% of clock the multicast gains: NOTES, session 15.)
FUSEDMOE_HD uint32_t cluster_units(uint32_t m_tiles, uint32_t n_tiles, uint32_t cluster) {
  return m_tiles / cluster * n_tiles + (m_tiles % cluster * n_tiles + cluster - 1) / cluster;
}

// CTA `rank`'s tile of the group's unit u (u < cluster_units).
template <uint32_t kCluster>
FUSEDMOE_HD ClusterTile cluster_tile(uint32_t u, uint32_t m_tiles, uint32_t n_tiles, uint32_t rank) {
  const uint32_t shared = m_tiles / kCluster * n_tiles;
  if (u < shared) {
    const uint32_t set = u / n_tiles;
    return {kCluster * set + rank, u - set * n_tiles, true};
  }
  // Tail tile i, row by row over the last m_tiles % kCluster m-tiles. (kCluster 2: one m-tile, i is the n-tile.)
  const uint32_t i = kCluster * (u - shared) + rank;
  if (kCluster == 2) return {m_tiles - 1, i, false};
  const uint32_t row = i / n_tiles, m_tile = m_tiles / kCluster * kCluster + row;
  if (m_tile >= m_tiles) return {m_tiles - 1, n_tiles, false};  // past the last tail tile: empty
  return {m_tile, i - row * n_tiles, false};
}

}  // namespace fusedmoe::detail
