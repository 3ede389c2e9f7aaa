// Hopper grouped GEMM: wgmma from 128-byte-swizzled shared memory, a warp-specialised mbarrier pipeline and
// a persistent tile loop. Serves the three products of the block (GemmKind nt / nn / tn) with the routing
// row maps applied in the loads (token gather) and the stores (slot scatter).
//
// CTA = 3 warpgroups. Warpgroup 0 is the producer: its 128 threads copy the routed (gathered) rows in
// 16-byte chunks with cp.async (zero-filled past the edges) straight into the swizzled layout wgmma
// reads, so gathered rows cost the same as contiguous ones. Warpgroups 1 and 2 are consumers: each owns
// 64 rows of the 128 × BN output tile, issues m64nBNk16 wgmmas over the stage and writes its accumulators
// out in the epilogue while the producer already fills the stages of the CTA's next tile. The epilogue
// goes through shared memory (the consumer's dead half of the last stage's A tile) so that global stores
// are whole 128-byte rows.
//
// nt / nn (the weight is B, shared by every m-tile of an expert): the weight tile arrives by TMA (one 3-D
// tensor map: contiguous dim, rows, experts, so a group's edges read as zeros). With kCluster = 2 (or 4) CTAs run
// in pairs (quads) that take neighbouring m-tiles of the same (expert, n-tile) and each loads a half (a quarter) of
// the weight tile into every CTA's shared memory (multicast), dividing the weight traffic out of L2; a stage is
// then full after the producer's 128 cp.async arrivals plus the TMA bytes of all parts, and free only when the
// consumers of every CTA have released it. A group's last m_tiles % kCluster m-tiles are split by n-tile between
// the cluster's CTAs (each loads its own weight tile), so no CTA idles beside them (decode_tile). The heuristic
// pairs CTAs where the groups are deep (launch_sm90).
//
// Shared-memory operand layout: "panels" of R rows × 64 elements (128 bytes per row); 16-byte chunk c of
// row r lives at r·128 + ((c ^ (r mod 8)) · 16), the 128-byte swizzle of TMA and wgmma. A K-major operand
// (nt/nn's A, nt's B) is one panel whose rows are output rows; an MN-major operand (nn's B, both tn
// operands) is 64 reduction rows × (width/64) panels.
//
// tn (dW): both operands are routed rows. On a group's full k-steps the operand read in expert order (dW2's
// w·A; dW1's dY1, for which dW1 is computed transposed so that dY1 is the wider B tile) arrives by TMA, a
// 64 × 64 box per panel; the gathered operand, and both on a group's tail k-step (whose rows past the
// group's end must read as zeros), are copied with cp.async. (All-cp.async dW1 stalled 38% of its warp
// samples on the stage barriers with L2 at 56% and DRAM at 27%: latency-bound.)
//
// Work units: each CTA (cluster) takes one unit at a time, its first by its index, the rest either every
// gridDim-th (static) or, for nt/nn where the launch lends a zeroed counter ("dynamic units", launch), from the
// counter as it finishes one: cluster rank 0's producer takes a unit a tile ahead and publishes it through a
// per-stage word and an mbarrier to every CTA of the cluster, whose consumers read it with the tile's first stage.
// Then the units that share a weight tile run at nearly the same time wherever the CTAs have drifted to.
//
// BN = 256 where the output is at least that wide, else 128. GEMM1 may run "gated": a tile's B rows are
// BN/2 gate rows and the matching BN/2 up rows, so the epilogue also writes SiLU(gate)·up.
//
// Deterministic: each output element is reduced by one thread in a fixed order, no atomics.
#include <cuda.h>          // CUtensorMap

#include <cstdio>
#include <cstdlib>
#include <type_traits>
#include <utility>

#include "../activation.hpp"
#include "../cluster_schedule.hpp"
#include "gemm_problem.cuh"
#include "wgmma.cuh"
#include "sm90_epilogue.cuh"
#include "sm90_primitives.cuh"
#include "sm90_tensor_map.cuh"

namespace fusedmoe::detail::cuda {
namespace sm90 {
namespace {

constexpr int kBM = 128;      // output rows per tile: two consumer warpgroups × 64
constexpr int kBK = 64;       // reduction depth per stage: one 128-byte row of 16-bit elements
constexpr int kThreads = 384;
constexpr int kPanelBytes = 64 * 128;  // an MN-major panel: 64 reduction rows × 128 bytes
constexpr int kMaxGroups = 1024;       // per-group tables (m-tile prefix, offsets) live in shared memory
// tn: the producer stages the row offsets of the next kChunkStages k-steps in shared memory, a chunk at a
// time (double-buffered; the gather entries are fetched a chunk ahead), so a k-step neither waits on a
// lookup nor recomputes row addresses.
constexpr int kChunkStages = 8;
constexpr int kSlotChunk = kChunkStages * kBK;
// Kernel variants for A/B measurements (FUSEDMOE_SM90_VARIANT, a bit set): two diagnostics that compute wrong
// results on purpose (no epilogue stores; no A-operand loads) to show what each costs, and the CTA start
// stagger switched off.
constexpr int kDiagNoStore = 2, kDiagNoA = 4, kNoStagger = 8;
// With this bit the two diagnostics apply to the dW (tn) kernels only, so the routing (the router GEMM) and the
// GEMMs before dW stay correct and a dW kernel's tiles are the real ones.
constexpr int kDiagTnOnly = 32;
// Diagnostics for why every overlapped epilogue slowed the mainloop (NOTES, sessions 10–12): the producer adds
// traffic during the mainloop of the 128 × 256 nt/nn kernels (not BN = 128, so the router's GEMM and the routing
// stay exact): per k-step 16 KB of shared-memory reads (kDiagSmemRead; 32 KB with kDiagDouble), or 8 KB of global
// stores into the tile's own output rows, which its epilogue overwrites later (kDiagGlobalStore; 16 KB doubled).
// The timeline build then shows whether the k-step grows when shared memory, or the SM's path to L2, carries more.
// Compiled only with -DFUSEDMOE_SM90_DIAG_TRAFFIC (TL_FLAGS of scripts/gpu_timeline.sh): the code costs registers.
#ifdef FUSEDMOE_SM90_DIAG_TRAFFIC
constexpr int kDiagSmemRead = 16, kDiagGlobalStore = 64, kDiagDouble = 128;
#endif

// Pipeline depth of the 128 × 256 tiles; a compile-time override for A/B builds.
#ifndef FUSEDMOE_SM90_STAGES256
#define FUSEDMOE_SM90_STAGES256 4
#endif

template <int BN>
struct Config {
  static constexpr int kStages = BN == 256 ? FUSEDMOE_SM90_STAGES256 : 6;
  static constexpr int kABytes = kBM * kBK * 2;
  static constexpr int kBBytes = BN * kBK * 2;
  static constexpr int kStageBytes = kABytes + kBBytes;
  // Dynamic units: one mbarrier (a unit published) and a unit word per stage, padded to 16 bytes (the tn row
  // offsets after them are read as 16-byte pairs).
  static constexpr int kUnitBytes = (8 + kStages * 4 + 15) / 16 * 16;
  static constexpr size_t smem_bytes(int groups) {
    return 1024 /* alignment slack */ + kStages * kStageBytes + 2 * kStages * 8 + kUnitBytes + 4 * kSlotChunk * 8 +
           2 * (groups + 1) * 4;  // s_row_off, s_prefix and s_offsets
  }
};

constexpr int kMaxSmem = 227 * 1024;  // sm_90's opt-in shared memory per block
static_assert(Config<128>::smem_bytes(kMaxGroups) <= kMaxSmem && Config<256>::smem_bytes(kMaxGroups) <= kMaxSmem,
              "the pipeline stages and group tables must fit in shared memory");

__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Diagnostic build (-DFUSEDMOE_SM90_TIMELINE): where a tile's time goes, in SM clock cycles summed over the
// kernels of one family (GemmKind, gated, output size, tile width, transposed C) and printed at process exit:
// the consumers' switch from one tile to the next (decoding it, looking up its rows, zeroing the accumulators),
// their wait for a tile's first stage, its mainloop and its epilogue, and the producer's waits for free stages.
// Thread 0 of each warpgroup measures; the default build compiles none of it.
enum TimelineField {
  kTlTiles, kTlKSteps, kTlSwitch, kTlFirstWait, kTlMainloop, kTlEpilogue, kTlProducerWait, kTlFields
};
#ifdef FUSEDMOE_SM90_TIMELINE
constexpr int kTimelineSlots = 64;
__device__ unsigned long long g_timeline[kTimelineSlots][kTlFields];
#endif
struct TileClock {
#ifdef FUSEDMOE_SM90_TIMELINE
  // 32-bit sums (a CTA's share of one kernel stays far below 2^32 cycles): fewer registers held in the loop.
  unsigned sum[kTlFields] = {};
  unsigned t = 0;
  bool on = false;
  __device__ void start(bool record) { on = record; if (on) t = static_cast<unsigned>(clock()); }
  __device__ void lap(int field) {
    if (on) { const unsigned now = static_cast<unsigned>(clock()); sum[field] += now - t; t = now; }
  }
  __device__ void add(int field, unsigned v) { if (on) sum[field] += v; }
  __device__ void flush(int slot) {
    if (on)
      for (int f = 0; f < kTlFields; ++f) atomicAdd(&g_timeline[slot][f], static_cast<unsigned long long>(sum[f]));
  }
#else
  __device__ void start(bool) {}
  __device__ void lap(int) {}
  __device__ void add(int, unsigned) {}
  __device__ void flush(int) {}
#endif
};

// Arrival on the barrier at the same shared-memory offset in CTA `rank` of the cluster. Default (CTA-scope)
// release: it only tells the peer's producer that this CTA's wgmmas, already complete, are done reading a
// stage. A cluster-scope release would compile to a GPU-wide memory barrier (MEMBAR.ALL.GPU) per stage,
// which waits for the epilogue's outstanding global stores: measured 2.40 vs 1.55 ms for GEMM1.
// The address of this CTA's shared-memory location `addr` in CTA `rank` of the cluster.
__device__ __forceinline__ uint32_t in_cta(uint32_t addr, uint32_t rank) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(addr), "r"(rank));
  return remote;
}
__device__ __forceinline__ void mbar_arrive_in_cta(uint32_t bar, uint32_t rank) {
  asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];\n" ::"r"(in_cta(bar, rank)) : "memory");
}
// Dynamic units: cluster rank 0 publishes the next unit into the unit word of every CTA of the cluster and
// arrives on each CTA's unit barrier (cluster-scope release: once per tile, so its memory barrier is cheap).
__device__ __forceinline__ void publish_unit(uint32_t word, uint32_t bar, uint32_t rank, uint32_t unit) {
  const uint32_t remote_word = in_cta(word, rank), remote_bar = in_cta(bar, rank);
  asm volatile("st.shared::cluster.u32 [%0], %1;\n" ::"r"(remote_word), "r"(unit) : "memory");
  asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];\n" ::"r"(remote_bar) : "memory");
}
__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}

__device__ __forceinline__ uint32_t swizzled(uint32_t panel, int row, int chunk) {
  return panel + row * 128 + ((chunk ^ (row & 7)) << 4);
}

// Producer thread `tid` copies, for a K-major tile, column chunk tid % 8 of rows tid/8 + 16·i, and for an
// MN-major tile, column chunks tid % 16 (+16, +32, … across the width) of rows tid/16 + 8·i.
constexpr int kMnRowsPerThread = 8;

// K-major operand tile: R rows × 64 reduction columns from k0; row i of this thread starts at
// base + row_off[i] (row_off < 0: past the edge, zero-filled).
template <int R, class T>
__device__ __forceinline__ void load_k_major(uint32_t dst, int tid, const T* base, const int64_t (&row_off)[R / 16],
                                             int64_t k0, int64_t K) {
  const int c = tid % 8;
  const bool col_ok = k0 + c * 8 < K;
#pragma unroll
  for (int i = 0; i < R / 16; ++i) {
    const bool ok = col_ok && row_off[i] >= 0;
    cp_async_16(swizzled(dst, tid / 8 + 16 * i, c), ok ? base + row_off[i] + k0 + c * 8 : base, ok);
  }
}

#ifdef FUSEDMOE_SM90_DIAG_TRAFFIC
// The producer's extra traffic of kDiagSmemRead / kDiagGlobalStore (one k-step's worth; see the variant bits).
template <class OutT>
__device__ __forceinline__ void diagnostic_traffic(int diag, bool twice, uint32_t a_dst, int tid, OutT* C,
                                                   const int64_t (&rows)[4]) {
  for (int rep = 0; rep < (twice ? 2 : 1); ++rep) {
    if (diag & kDiagSmemRead) {
#pragma unroll
      for (int i = 0; i < 8; ++i) {  // eight 16-byte reads per thread over the stage's A tile (16 KB); volatile: kept
        uint32_t v[4];
        asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(v[0]), "=r"(v[1]), "=r"(v[2]), "=r"(v[3]) : "r"(a_dst + (i * 128 + tid) * 16));
      }
    }
    if ((diag & kDiagGlobalStore) && C != nullptr)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        if (rows[i] >= 0) *reinterpret_cast<uint4*>(C + rows[i]) = make_uint4(0, 0, 0, 0);
  }
}
#endif

// MN-major operand tile (the dW producer): 64 reduction rows × Width columns (Width/64 panels); thread tid copies
// column chunks tid % 16 (+16, … across the width) of rows tid/16 + 8·i. Its column pointers, bounds and swizzled
// destinations are fixed for a tile, so they are set up once per tile; a k-step then costs per row a share of a
// 16-byte offset load, a bit test and mask, a 64-bit add and the cp.async. (The dW k-step was bound by the
// producer's instruction stream: ~15 instructions per row before.)
template <int Width, class T>
struct MnMajorCopy {
  static constexpr int kJ = Width / 128;  // 16-byte chunks per thread and row
  const char* col[kJ];                     // the thread's column chunk in row 0
  uint32_t dst[kJ];                        // its swizzled destination in row 0 of the tile (rows i: +1024·i)
  bool col_ok[kJ];
  __device__ __forceinline__ MnMajorCopy(int tid, const T* base, int64_t col0, int64_t cols) {
#pragma unroll
    for (int j = 0; j < kJ; ++j) {
      const int cc = tid % 16 + 16 * j;  // chunk within the row: panel cc / 8, chunk cc % 8
      col_ok[j] = col0 + cc * 8 < cols;
      col[j] = reinterpret_cast<const char*>(base + (col_ok[j] ? col0 + cc * 8 : 0));
      // Rows tid/16 + 8·i all have (row mod 8) = (tid/16) mod 8, so one swizzled chunk serves every i.
      dst[j] = (cc / 8) * kPanelBytes + (tid / 16) * 128 + (((cc % 8) ^ (tid / 16 % 8)) << 4);
    }
  }
  // row_bytes: staged byte offsets of the thread's rows tid/16 + 8·i (kPastEnd: past the group's end, zero-filled).
  __device__ __forceinline__ void operator()(uint32_t tile_dst, const int64_t (&row_bytes)[kMnRowsPerThread]) const {
#pragma unroll
    for (int j = 0; j < kJ; ++j) {
#pragma unroll
      for (int i = 0; i < kMnRowsPerThread; ++i) {
        const bool ok = col_ok[j] && !(static_cast<uint32_t>(row_bytes[i]) & kPastEnd);  // a 32-bit bit test
        cp_async_16(tile_dst + dst[j] + 1024 * i, col[j] + (row_bytes[i] & ~kPastEnd), ok);
      }
    }
  }
  // A staged row offset with this bit is past the group's end (byte offsets of rows are multiples of 16); masked
  // off, it leaves row 0's valid address, which a zero-fill copy does not read.
  static constexpr int64_t kPastEnd = 1;
};

// Output columns a tile covers, and the column tiles. Gated (GEMM1 with SiLU·mul): BN/2 act columns, whose
// gate and up columns of C sit side by side in the tile.
template <int BN, bool kGated>
constexpr int64_t tile_width() { return kGated ? BN / 2 : BN; }
template <int BN, bool kGated, class T, class OutT>
__host__ __device__ __forceinline__ int64_t column_tiles(const Problem<T, OutT>& p) {
  const int64_t cols = kGated ? p.N / 2 : p.N;
  return (cols + tile_width<BN, kGated>() - 1) / tile_width<BN, kGated>();
}

// tn's tile decoding divides by the kernel's fixed tile counts as multiply-shifts: by the column tiles and by the
// tiles per group. Tile indices stay below 2^31 (the launch declines larger problems).
struct TileDivs {
  num::FastDivU31 n_tiles, per_group;
};

// One output tile of the persistent loop.
struct Tile {
  int group;
  int64_t m0, n0;     // origin in the output (nt/nn: m0 counts rows within the group)
  int64_t row_begin;  // the group's first routed row
  int64_t rows;       // the group's routed rows (nt/nn: output rows; tn: reduction length)
  int64_t k_tiles;
  bool multicast;     // nt/nn clusters: the weight tile is shared by the cluster (each CTA loads a part into all)
};

// Work unit t of the persistent loop -> this CTA's tile. nt/nn single CTAs: an m-tile × an n-tile, s_prefix
// counting m-tiles per group. nt/nn clusters (kCluster 2 or 4): s_prefix counts units per group, and a group's units
// map to tiles as cluster_tile says (src/cluster_schedule.hpp; tested on the CPU). All CTAs of a cluster decode the
// same unit and step through the same k-tiles.
template <GemmKind kKind, int BN, bool kGated, int kCluster, class T, class OutT>
__device__ __forceinline__ Tile decode_tile(const Problem<T, OutT>& p, const int32_t* s_prefix,
                                            const int32_t* s_offsets, int64_t t, uint32_t rank, const TileDivs& divs) {
  const DeviceRouting& rt = p.routing;
  const int64_t n_tiles = column_tiles<BN, kGated>(p);
  // nt/nn: the group of prefix position `key` (an m-tile, or a cluster unit): the last g with prefix[g] <= key
  // (empty groups have none).
  auto group_of = [&](int64_t key) {
    int lo = 0, hi = rt.num_experts;
    while (hi - lo > 1) {
      const int mid = (lo + hi) / 2;
      if (s_prefix[mid] <= key) lo = mid; else hi = mid;
    }
    return lo;
  };
  Tile tile;
  tile.multicast = false;
  if constexpr (kKind != GemmKind::tn && kCluster > 1) {
    const int lo = group_of(t);
    tile.group = lo;
    tile.row_begin = s_offsets[lo];
    tile.rows = s_offsets[lo + 1] - tile.row_begin;
    // Unit counts stay below 2^31 (the launch declines more): 32-bit arithmetic.
    const uint32_t m_tiles = static_cast<uint32_t>((tile.rows + kBM - 1) / kBM);
    const ClusterTile ct = cluster_tile<kCluster>(static_cast<uint32_t>(t - s_prefix[lo]), m_tiles,
                                                  static_cast<uint32_t>(n_tiles), rank);
    const uint32_t m_tile = ct.m_tile, n_index = ct.n_tile;
    tile.multicast = ct.multicast;
    tile.m0 = static_cast<int64_t>(m_tile) * kBM;
    tile.n0 = static_cast<int64_t>(n_index) * tile_width<BN, kGated>();
    tile.k_tiles = p.K > 0 ? (p.K + kBK - 1) / kBK : 0;
    return tile;
  }
  // t / n_tiles; tn (whose producer decodes twice per tile of few k-steps) by the multiply-shift, nt/nn (registers
  // are tight in the gated consumers, and tiles are long) by the division.
  const int64_t row_tile = kKind == GemmKind::tn ? divs.n_tiles(static_cast<uint32_t>(t)) : t / n_tiles;
  int64_t m_tile;
  if constexpr (kKind == GemmKind::tn) {
    tile.group = static_cast<int>(divs.per_group(static_cast<uint32_t>(t)));
    m_tile = row_tile - tile.group * ((p.M + kBM - 1) / kBM);
  } else {
    tile.group = group_of(row_tile);
    m_tile = row_tile - s_prefix[tile.group];
  }
  tile.m0 = m_tile * kBM;
  tile.n0 = (t - row_tile * n_tiles) * tile_width<BN, kGated>();
  tile.row_begin = s_offsets[tile.group];
  tile.rows = s_offsets[tile.group + 1] - tile.row_begin;
  const int64_t depth = kKind == GemmKind::tn ? tile.rows : p.K;
  tile.k_tiles = depth > 0 ? (depth + kBK - 1) / kBK : 0;
  return tile;
}

// tn: which operand, read in expert order (RowMap::identity), comes by TMA on a group's full k-steps.
enum TnTma : int { kTnTmaNone = 0, kTnTmaA = 1, kTnTmaB = 2 };

// kCluster (nt/nn): 2 or 4 multicast the weight tile to that many CTAs, 1 has each CTA load all of it itself.
// b_map: nt/nn the weight operand's tensor map; tn the map of operand tn_tma (if any).
// unit_counter (nt/nn; null: every unit_stride-th unit): a zeroed counter from which the clusters take their units
// after the first as they finish one ("dynamic units"; see the producer loop).
template <class T, class OutT, int BN, GemmKind kKind, bool kGated, int kCluster>
__global__ void __launch_bounds__(kThreads, 1)
    gemm_sm90_kernel(const Problem<T, OutT> p, int64_t total_tiles, const __grid_constant__ CUtensorMap b_map,
                     int variant, int tn_tma, unsigned* unit_counter) {
  using Cfg = Config<BN>;
  constexpr int S = Cfg::kStages;
  static_assert(kCluster == 1 || ((kCluster == 2 || kCluster == 4) && kKind != GemmKind::tn),
                "clusters share the weight tile of nt/nn");
  // The weight tile arrives in kParts TMA boxes (two at least: a gated tile's gate and up rows are apart); in a
  // cluster CTA r loads part r into every CTA. nn's parts are whole 64-column panels.
  constexpr int kParts = kCluster > 2 ? kCluster : 2;
  static_assert(kKind != GemmKind::nn || BN / 64 % kParts == 0, "nn: whole panels per part");
  const uint32_t rank = kCluster > 1 ? cluster_rank() : 0;
  // Work units are dealt out per cluster: every CTA of a cluster takes the same units.
  const int64_t first_unit = blockIdx.x / kCluster, unit_stride = gridDim.x / kCluster;
  extern __shared__ uint8_t smem_raw[];
  // Aligned by offsetting the shared array itself (not via an integer round trip), so the compiler still
  // knows every pointer below is shared memory and emits shared loads rather than generic ones.
  uint8_t* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  const uint32_t stages = smem_u32(smem);
  // S barriers: stage filled (128 producer cp.async arrivals, plus the TMA issuer's expect-tx arrival)
  const uint32_t full_bar = stages + S * Cfg::kStageBytes;
  const uint32_t empty_bar = full_bar + S * 8;  // S barriers: stage consumed (8 consumer warps per CTA of the cluster)
  // Dynamic units: the barrier of a published unit, then per stage the unit after the tile whose first stage it is.
  const uint32_t unit_bar = empty_bar + S * 8, unit_words = unit_bar + 8;
  volatile int32_t* s_unit = reinterpret_cast<volatile int32_t*>(smem + (unit_words - stages));
  // tn: [2 buffers][A, B][kSlotChunk] byte offsets of the staged rows (MnMajorCopy::kPastEnd past the group's end).
  int64_t* s_row_off = reinterpret_cast<int64_t*>(smem + S * Cfg::kStageBytes + 2 * S * 8 + Cfg::kUnitBytes);
  static_assert((2 * S * 8 + Cfg::kUnitBytes) % 16 == 0, "s_row_off is read as 16-byte pairs");
  int32_t* s_prefix = reinterpret_cast<int32_t*>(s_row_off + 4 * kSlotChunk);  // [E+1] units before group e
  int32_t* s_offsets = s_prefix + p.routing.num_experts + 1;  // [E+1] the groups' first routed rows
  const DeviceRouting& rt = p.routing;
  // Tile decoding reads the group offsets from shared memory: no global-load latency at a tile switch.
  for (int e = threadIdx.x; e <= rt.num_experts; e += blockDim.x) s_offsets[e] = static_cast<int32_t>(rt.offset(e));

  if (threadIdx.x == 0) {
    for (int s = 0; s < S; ++s) {
      // 128 producer cp.async arrivals and one expect-tx arrival (nt/nn: the weight tile by TMA; tn: the TMA
      // operand's bytes, or none on k-steps that copy both operands with cp.async).
      mbar_init(full_bar + 8 * s, 128 + 1);
      mbar_init(empty_bar + 8 * s, 8 * kCluster);
    }
    mbar_init(unit_bar, 1);
    if constexpr (kCluster > 1) asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  if constexpr (kKind != GemmKind::tn) {
    // Unit prefix over the groups (one warp scan: single CTAs count m-tiles, clusters units; see decode_tile), and
    // from it the number of units.
    if (threadIdx.x < 32) {
      const int lane = threadIdx.x;
      int running = 0;
      for (int e0 = 0; e0 < rt.num_experts; e0 += 32) {
        const int e = e0 + lane;
        int tiles = 0;
        if (e < rt.num_experts) {
          const int m_tiles = static_cast<int>((rt.offset(e + 1) - rt.offset(e) + kBM - 1) / kBM);
          const int n_tiles = static_cast<int>(column_tiles<BN, kGated>(p));
          tiles = kCluster == 1 ? m_tiles : static_cast<int>(cluster_units(m_tiles, n_tiles, kCluster));
        }
        const int incl = warp_inclusive_sum(tiles, lane);
        if (e < rt.num_experts) s_prefix[e + 1] = running + incl;
        running += __shfl_sync(0xffffffffu, incl, 31);
      }
      if (lane == 0) s_prefix[0] = 0;
    }
  }
  // The peer CTA arrives on this CTA's barriers and multicasts into its shared memory: both must be set up.
  if constexpr (kCluster > 1) cluster_sync(); else __syncthreads();
  if constexpr (kKind != GemmKind::tn)
    total_tiles = static_cast<int64_t>(s_prefix[rt.num_experts]) * (kCluster == 1 ? column_tiles<BN, kGated>(p) : 1);

  // (The launch passes a counter only where every tile spans at least S stages: see the unit barrier's phases in
  // the producer loop. Consumers read the next unit at a tile's first stage, so no tile may be empty.)
  const bool dynamic = kKind != GemmKind::tn && unit_counter != nullptr;
  const int64_t n_tiles = kKind == GemmKind::tn ? column_tiles<BN, kGated>(p) : 1;  // (unused by nt/nn)
  const int64_t tiles_per_group = kKind == GemmKind::tn ? ((p.M + kBM - 1) / kBM) * n_tiles : 1;
  const TileDivs divs{num::FastDivU31(static_cast<uint32_t>(n_tiles > 0 ? n_tiles : 1)),
                      num::FastDivU31(static_cast<uint32_t>(tiles_per_group > 0 ? tiles_per_group : 1))};
  const int warpgroup = threadIdx.x / 128, tid = threadIdx.x % 128;
  const int timeline_slot = static_cast<int>(kKind) * 16 + (kGated ? 8 : 0) + (sizeof(OutT) == 4 ? 4 : 0) +
                            (BN == 128 ? 2 : 0) + (p.c_transposed ? 1 : 0);
  TileClock tile_clock;
  tile_clock.start(tid == 0);
  if (warpgroup == 0) {
    // ---- producer ----
    // Each thread's copies signal the stage's full barrier when they land (noinc: the 128 arrivals are the
    // barrier's count), so the producer never waits on its own copies and runs up to S stages ahead.
    int stage = 0;
    uint32_t phase = 0;
    uint32_t chunk_count = 0;  // tn: slot chunks staged so far
    auto next_stage = [&](const auto& issue) {
      tile_clock.start(tid == 0);
      mbar_wait(empty_bar + 8 * stage, phase ^ 1);
      tile_clock.lap(kTlProducerWait);
      const uint32_t a_dst = stages + stage * Cfg::kStageBytes;
      issue(a_dst, a_dst + Cfg::kABytes);
      asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(full_bar + 8 * stage) : "memory");
      if (++stage == S) stage = 0, phase ^= 1;
    };
    // A tile's routed rows (nt/nn: A's rows; tn: the first chunk of gather entries) are looked up while
    // the CTA's previous tile is still being copied, so a tile switch waits on no global load.
    // nt/nn: this thread's A rows of the tile looked up last (a tile ahead of copying it): the routed rows a_first +
    // tid/8 + 16·i below a_limit, and for a gathered A their gather entries, still in flight until that tile starts
    // and a_rows turns them into offsets. (Turned at once, the clamping branched on each loaded entry, so a lookup
    // was eight load latencies in a row, ~5000 cycles a tile ahead, which an inference GEMM1's short epilogue left
    // partly exposed as the consumers' first-stage wait.)
    int32_t a_entry[kBM / 16];
    int64_t a_first = 0, a_limit = 0, a_shift = 0;  // a_shift: added to every row offset (split-K: the group's slice)
    // tn: this thread's share of the next gather chunk, in flight: the raw entries (clamped when the chunk is staged,
    // so that nothing waits on the loads now: clamped here, the four loads ran one after another, each stalled on, at
    // every chunk's start before its first k-step's copies) and which of them lie before the group's end.
    int32_t ahead[kSlotChunk / 128];
    uint32_t ahead_valid = 0;
    const bool needs_gather = p.a_map != RowMap::identity || p.b_map != RowMap::identity;
    auto lookup_rows = [&](const Tile& tl) {
      a_first = tl.row_begin + tl.m0, a_limit = tl.rows - tl.m0;
      if constexpr (kKind == GemmKind::nt) a_shift = p.a_k_split ? tl.group * p.K - tl.row_begin * p.lda : 0;
#pragma unroll
      for (int i = 0; i < kBM / 16; ++i) {
        const int r = tid / 8 + 16 * i;
        a_entry[i] = p.a_map != RowMap::identity && r < a_limit ? rt.gather[a_first + r] : 0;
      }
    };
    auto a_rows = [&](int64_t (&off)[kBM / 16]) {  // element offsets of the looked-up rows (-1: past the group)
#pragma unroll
      for (int i = 0; i < kBM / 16; ++i) {
        const int r = tid / 8 + 16 * i;
        off[i] = r < a_limit ? rt.row_of(p.a_map, a_first + r, rt.clamp_slot(a_entry[i])) * p.lda + a_shift : -1;
      }
    };
    auto prefetch = [&](const Tile& tl, int64_t first) {
#pragma unroll
      for (int q = 0; q < kSlotChunk / 128; ++q) {
        const int64_t k = first + tid + 128 * q;
        const bool valid = k < tl.rows;
        ahead[q] = valid && needs_gather ? rt.gather[tl.row_begin + k] : 0;
        ahead_valid = valid ? ahead_valid | (1u << q) : ahead_valid & ~(1u << q);
      }
    };
    // The tile first_lookup decoded last: every tile of the loop below was looked up just before (a tile ahead), so
    // the loop takes it from here instead of decoding it again (nt/nn: a binary search over the groups).
    Tile looked_up{};
    auto first_lookup = [&](int64_t t) {
      if (t >= total_tiles) return;
      looked_up = decode_tile<kKind, BN, kGated, kCluster>(p, s_prefix, s_offsets, t, rank, divs);
      if constexpr (kKind == GemmKind::tn) prefetch(looked_up, 0); else lookup_rows(looked_up);
    };
    first_lookup(first_unit);
    if (kKind != GemmKind::tn && !(variant & kNoStagger) && total_tiles >= 8 * unit_stride) {
      // nt/nn tiles all take the same time, so without this every CTA would run its epilogue at the same moment
      // and the SMs' stores would arrive at L2 in one burst, competing with the operand loads. CTAs start in
      // four phases a quarter of a tile apart (about 0.8 µs per k-step), the later phases those with fewer
      // tiles; only where CTAs have several tiles, so the delay is a small part of each CTA's work.
      // (H100, T=16384: dA 772 -> 719 µs, dX 1390 -> 1340, GEMM1 1650 -> 1620.)
      const int64_t phase = first_unit * 4 / unit_stride;
      const uint64_t wait_ns = static_cast<uint64_t>(phase * ((p.K + kBK - 1) / kBK) * 200);
      const uint64_t start = global_ns();
      while (global_ns() - start < wait_ns) __nanosleep(500);
    }
    // Dynamic units: the unit barrier completes a phase per tile. Cluster rank 0's thread 0 takes units from the
    // counter a tile ahead (`pending`, the unit after the next), so the atomic's latency is hidden behind a tile.
    uint32_t units_taken = 0;
    auto take_unit = [&] {
      const int64_t taken = unit_stride + static_cast<int64_t>(atomicAdd(unit_counter, 1u));
      return static_cast<uint32_t>(taken < total_tiles ? taken : total_tiles);  // past the end: the end
    };
    uint32_t pending = static_cast<uint32_t>(total_tiles);
    if (dynamic && rank == 0 && tid == 0 && first_unit < total_tiles) pending = take_unit();
    for (int64_t t = first_unit, t_next; t < total_tiles; t = t_next) {
      const Tile tile = looked_up;
      t_next = t + unit_stride;
      if constexpr (kKind != GemmKind::tn) {
        int64_t rows_now[kBM / 16];
        a_rows(rows_now);
        if (!dynamic) first_lookup(t_next);  // lands while this tile's stages are copied
        const int group = tile.group, n0 = static_cast<int>(tile.n0);
#ifdef FUSEDMOE_SM90_DIAG_TRAFFIC
        const int diag = BN == 256 ? variant & (kDiagSmemRead | kDiagGlobalStore) : 0;
        int64_t diag_rows[4] = {-1, -1, -1, -1};  // kDiagGlobalStore: element offsets of 64 of the tile's output rows
        if ((diag & kDiagGlobalStore) && p.C != nullptr && p.ldc % 8 == 0 && n0 + 64 <= p.ldc &&
            reinterpret_cast<uintptr_t>(p.C) % 16 == 0)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int64_t m = tile.m0 + tid / 8 + 16 * i;
            if (m < tile.rows) diag_rows[i] = rt.row(p.c_map, tile.row_begin + m) * p.ldc + n0 + (tid % 8) * 8;
          }
#endif
        for (int64_t kt = 0; kt < tile.k_tiles; ++kt) {
          const int k0 = static_cast<int>(kt * kBK);
          next_stage([&](uint32_t a_dst, uint32_t b_dst) {
            if (dynamic && kt == 0) {
              // The tile's first stage is free: cluster rank 0 writes the next tile's unit into this stage's unit
              // word in every CTA, whose producers wait for it here and whose consumers read it when the stage is
              // full. (The word's previous value was read before that stage was released, by the consumers of
              // every CTA. The unit barrier cannot complete two phases before a peer's producer waits on the first:
              // the second needs a stage of this tile released by the peer's consumers, so filled by its producer
              // after that wait, since every tile spans at least S stages.)
              if (rank == 0 && tid == 0) {
                for (uint32_t r = 0; r < kCluster; ++r) publish_unit(unit_words + 4 * stage, unit_bar, r, pending);
                if (pending < total_tiles) pending = take_unit();  // awaited only at the next tile's publish
              }
              mbar_wait<true>(unit_bar, units_taken++ & 1);
              t_next = s_unit[stage];
            }
            if (tid == 0) {
              // The weight tile comes in kParts parts; in a cluster sharing it each CTA loads one into all CTAs. The
              // stage is full with all BN rows. (Rows or columns past the group's weight read as zeros or as other
              // rows of the weight: they only reach output columns the epilogue does not store.)
              mbar_arrive_expect_tx(full_bar + 8 * stage, Cfg::kBBytes);
              const uint32_t bar = full_bar + 8 * stage;
              auto load_part = [&](int part, auto multicast) {
                constexpr int kTo = decltype(multicast)::value ? kCluster : 1;
                constexpr int kRows = BN / kParts;
                if constexpr (kKind == GemmKind::nt) {
                  // K-major: BN/kParts rows. Gated: the first half of the parts are gate rows n0…, the rest the up
                  // rows I + n0….
                  constexpr int kHalf = kParts / 2;
                  const int row0 = kGated ? (part < kHalf ? n0 + part * kRows
                                                          : static_cast<int>(p.N / 2) + n0 + (part - kHalf) * kRows)
                                          : n0 + part * kRows;
                  tma_load<kTo>(b_dst + part * kRows * 128, &b_map, bar, k0, row0, group);
                } else {
                  // MN-major: BN/64 panels of 64 reduction rows × 64 columns, BN/64/kParts per part.
#pragma unroll
                  for (int q = 0; q < kRows / 64; ++q) {
                    const int panel = part * (kRows / 64) + q;
                    tma_load<kTo>(b_dst + panel * kPanelBytes, &b_map, bar, n0 + 64 * panel, k0, group);
                  }
                }
              };
              if (kCluster > 1 && tile.multicast) {
                load_part(static_cast<int>(rank), std::true_type{});
              } else {
#pragma unroll
                for (int part = 0; part < kParts; ++part) load_part(part, std::false_type{});
              }
            }
            if (!(variant & kDiagNoA)) load_k_major<kBM>(a_dst, tid, p.A, rows_now, k0, p.K);
#ifdef FUSEDMOE_SM90_DIAG_TRAFFIC
            if (diag) diagnostic_traffic(diag, variant & kDiagDouble, a_dst, tid, p.C, diag_rows);
#endif
          });
          if (dynamic && kt == 0) first_lookup(t_next);
        }
      } else {
        // Both operands' rows are the group's routed rows k0 + r, through the row offsets staged in s_row_off.
        if (tile.k_tiles == 0) first_lookup(t_next);  // nothing to stage: move on to the next tile's rows
        const MnMajorCopy<kBM, T> copy_a(tid, p.A, tile.m0, p.M);
        const MnMajorCopy<BN, T> copy_b(tid, p.B, tile.n0, p.N);
        for (int64_t kt = 0; kt < tile.k_tiles; ++kt) {
          if (kt % kChunkStages == 0) {
            // Buffers alternate chunk by chunk across tiles: the one written here was last read two chunks
            // ago, before every producer thread passed the previous chunk's barrier.
            // Row k = 64·s + r of the chunk (k-step s, row r) is kept at 64·s + 8·(r mod 8) + r / 8: the eight rows a
            // copying thread takes in a k-step (r = tid/16 + 8·i) sit side by side, four 16-byte loads.
            int64_t* buf = s_row_off + (chunk_count++ & 1) * 2 * kSlotChunk;
#pragma unroll
            for (int q = 0; q < kSlotChunk / 128; ++q) {
              const int64_t slot = (ahead_valid >> q & 1) ? rt.clamp_slot(ahead[q]) : -1;
              const int k = tid + 128 * q, at = (k / kBK) * kBK + (k % 8) * 8 + (k % kBK) / 8;
              const int64_t i = tile.row_begin + kt * kBK + k;  // the routed row
              auto row = [&](RowMap map) -> int64_t {
                return map == RowMap::identity ? i : map == RowMap::token ? rt.token_of(slot) : slot;
              };
              constexpr int64_t kPastEnd = MnMajorCopy<kBM, T>::kPastEnd;  // byte offsets (MnMajorCopy)
              buf[at] = slot < 0 ? kPastEnd : row(p.a_map) * p.lda * static_cast<int64_t>(sizeof(T));
              buf[kSlotChunk + at] = slot < 0 ? kPastEnd : row(p.b_map) * p.ldb * static_cast<int64_t>(sizeof(T));
            }
            asm volatile("bar.sync 1, 128;\n" ::: "memory");  // the producer warpgroup only
            if (kt + kChunkStages < tile.k_tiles) prefetch(tile, (kt + kChunkStages) * kBK);
            else first_lookup(t_next);
          }
          const int64_t* staged =
              s_row_off + ((chunk_count - 1) & 1) * 2 * kSlotChunk + (kt % kChunkStages) * kBK + (tid / 16) * 8;
          auto offsets = [&](int operand, int64_t (&off)[kMnRowsPerThread]) {
            const longlong2* v = reinterpret_cast<const longlong2*>(staged + operand * kSlotChunk);
#pragma unroll
            for (int i = 0; i < kMnRowsPerThread / 2; ++i) {
              const longlong2 pair = v[i];
              off[2 * i] = pair.x, off[2 * i + 1] = pair.y;
            }
          };
          // A k-step of 64 of the group's rows (not its tail) reads the operand in expert order as one box
          // per 64-column panel by TMA; rows past the group's end (tail k-steps) must read as zeros, which only
          // the cp.async path's zero-fill gives, so the tail copies both operands.
          const int tma = (kt + 1) * kBK <= tile.rows ? tn_tma : kTnTmaNone;
          next_stage([&](uint32_t a_dst, uint32_t b_dst) {
            // The stage's TMA boxes, one panel per producer warp (lane 0), so that no warp carries the issue of
            // all of them on top of its copies; tid 0 adds the bytes to the barrier (the boxes may land first: the
            // phase cannot complete before this arrival).
            const int panels = tma == kTnTmaA ? kBM / 64 : tma == kTnTmaB ? BN / 64 : 0;
            const uint32_t bar = full_bar + 8 * stage;
            if (tid == 0) mbar_arrive_expect_tx(bar, panels * kPanelBytes);
            if (tid % 32 == 0) {
              const int col0 = static_cast<int>(tma == kTnTmaA ? tile.m0 : tile.n0);
              const int row0 = static_cast<int>(tile.row_begin + kt * kBK);
              for (int q = tid / 32; q < panels; q += 4)
                tma_load<1>((tma == kTnTmaA ? a_dst : b_dst) + q * kPanelBytes, &b_map, bar, col0 + 64 * q, row0, 0);
            }
            int64_t off[kMnRowsPerThread];
            if (tma != kTnTmaA) {
              offsets(0, off);
              if (!(variant & kDiagNoA)) copy_a(a_dst, off);
            }
            if (tma != kTnTmaB) {
              offsets(1, off);
              copy_b(b_dst, off);
            }
          });
        }
      }
    }
  } else {
    // ---- consumers ----
    const int consumer = warpgroup - 1;  // output rows consumer·64 … +63 of the tile
    const int warp = tid / 32, lane = tid % 32;
#ifndef FUSEDMOE_SM90_DIAG_TN_KMAJOR_A
    constexpr int kTransA = kKind == GemmKind::tn ? 1 : 0;
#else
    // Diagnostic build (wrong dW results on purpose): the dW consumers read their MN-major A tile as if it were
    // K-major (the same shared-memory bytes), to time the wgmma with one MN-major operand against two.
    constexpr int kTransA = 0;
#endif
    constexpr int kTransB = kKind == GemmKind::nt ? 0 : 1;
    auto release = [&](int s) {
      __syncwarp();
      if (lane == 0) {
        if constexpr (kCluster == 1) {
          mbar_arrive(empty_bar + 8 * s);
        } else {
#pragma unroll
          for (uint32_t r = 0; r < kCluster; ++r) mbar_arrive_in_cta(empty_bar + 8 * s, r);  // every CTA fills it
        }
      }
    };
    float acc[BN / 2];
    int stage = 0, prev_stage = 0;
    uint32_t phase = 0;
    for (int64_t t = first_unit, t_next; t < total_tiles; t = t_next) {
      const Tile tile = decode_tile<kKind, BN, kGated, kCluster>(p, s_prefix, s_offsets, t, rank, divs);
      t_next = t + unit_stride;  // dynamic units: the unit word of the tile's first stage
      // The gather entries of the thread's two output rows (their slots, for a scattered C or row scales) are
      // loaded now and used only after the mainloop, so the loads land meanwhile. (Used here, where the destination
      // offsets were computed before, they stalled every tile's start for two dependent global-load latencies with
      // the tensor cores idle: the clamping branched on each loaded value.)
      const bool slot_rows = kKind != GemmKind::tn && (p.c_map != RowMap::identity || p.row_scale != nullptr);
      int32_t slot_entry[2] = {0, 0};
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t m = tile.m0 + consumer * 64 + warp * 16 + lane / 4 + 8 * h;
        if (slot_rows && m < tile.rows) slot_entry[h] = rt.gather[tile.row_begin + m];
      }
      // Zeroed here rather than with scale-d = 0 on the first wgmma: the accumulators are then dead from the
      // previous epilogue to this point, which keeps the tile switch from spilling them.
#pragma unroll
      for (int i = 0; i < BN / 2; ++i) acc[i] = 0.f;
      tile_clock.lap(kTlSwitch);  // since the last tile's epilogue (the first tile: since the kernel's start)
      tile_clock.add(kTlTiles, 1);
      tile_clock.add(kTlKSteps, static_cast<unsigned>(tile.k_tiles));
      for (int64_t kt = 0; kt < tile.k_tiles; ++kt) {
        mbar_wait(full_bar + 8 * stage, phase);
        if (kt == 0) {
          tile_clock.lap(kTlFirstWait);
          if (dynamic) t_next = s_unit[stage];
        }
        fence_proxy_async();  // the producer's cp.async data (generic proxy) is read by wgmma (async proxy)
        const uint32_t a = stages + stage * Cfg::kStageBytes, b = a + Cfg::kABytes;
        // The stage's k16 slices [0, slices) as one batch of wgmmas.
        auto mma_stage = [&](auto slices) {
          wgmma_fence();
#pragma unroll
          for (int k16 = 0; k16 < decltype(slices)::value; ++k16) {
            // K-major: the next 16 elements are 32 bytes further along the swizzled row; MN-major: 16 rows down.
            const uint64_t da = kTransA ? smem_desc(a + consumer * kPanelBytes + k16 * 2048, kPanelBytes, 1024)
                                        : smem_desc(a + consumer * 64 * 128 + k16 * 32, 16, 1024);
            const uint64_t db = kTransB ? smem_desc(b + k16 * 2048, kPanelBytes, 1024) : smem_desc(b + k16 * 32, 16, 1024);
            Wgmma<T, BN>::template mma<kTransA, kTransB>(acc, da, db);
          }
          wgmma_commit();
        };
        static_assert(kBK == 64, "the dW tail's slice counts below assume four k16 slices a stage");
        // dW: a group's tail k-step holds zeros past its last row; the k16 slices of zeros alone are skipped (at
        // ~256 rows a group, T=4096, the tail is one k-step in five, on average 1.5 of its 4 slices empty). Each
        // count is its own straight-line batch: a branch between the wgmmas of one batch makes ptxas serialise them.
        const int64_t rows_left = kKind == GemmKind::tn ? tile.rows - kt * kBK : kBK;
        if (rows_left > 48) mma_stage(std::integral_constant<int, 4>{});
        else if (rows_left > 32) mma_stage(std::integral_constant<int, 3>{});
        else if (rows_left > 16) mma_stage(std::integral_constant<int, 2>{});
        else mma_stage(std::integral_constant<int, 1>{});
        wgmma_wait<1>();  // the previous stage's wgmmas are done: hand that stage back
        if (kt > 0) release(prev_stage);
        prev_stage = stage;
        if (++stage == S) stage = 0, phase ^= 1;
      }
      wgmma_wait<0>();
      pin_registers(acc);
      tile_clock.lap(kTlMainloop);
      if (variant & kDiagNoStore) {
        if (tile.k_tiles > 0) release(prev_stage);
        continue;
      }
      // The epilogue's destination rows and row scales.
      int64_t out_off[2] = {-1, -1};  // element offsets of the thread's two output rows in C
      int64_t act_off[2] = {0, 0};    // gated: and in act
      float row_scale[2] = {1.f, 1.f};
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t m = tile.m0 + consumer * 64 + warp * 16 + lane / 4 + 8 * h;
        if constexpr (kKind == GemmKind::tn) {
          if (m < p.M) out_off[h] = tile.group * p.c_group_stride + m * p.ldc;
        } else if (m < tile.rows) {
          const int64_t i = tile.row_begin + m, slot = rt.clamp_slot(slot_entry[h]);
          out_off[h] = rt.row_of(p.c_map, i, slot) * p.ldc;
          if constexpr (kGated) act_off[h] = i * p.ld_act;
          if (p.row_scale) row_scale[h] = to_f32(p.row_scale[slot]);
        }
      }
      if constexpr (kKind == GemmKind::tn && sizeof(OutT) == 2) {
        if (p.c_transposed) {
          // C[e] holds the tile transposed: output row n is 64 of this warpgroup's m values. Per 64-column
          // slice the warpgroup writes its accumulators transposed into its dead A panel (64 n-rows of 128
          // bytes; 16-byte chunk c of row n at c ^ (n mod 8), so a stmatrix's eight rows hit distinct banks),
          // then stores whole 128-byte rows. Named barrier 2 + consumer: this warpgroup only.
          uint8_t* block = tile.k_tiles > 0 ? smem + prev_stage * Cfg::kStageBytes + consumer * kPanelBytes : nullptr;
          const int64_t m_base = tile.m0 + consumer * 64;
          OutT* c_group = p.C + tile.group * p.c_group_stride;
#pragma unroll
          for (int q = 0; q < BN / 64; ++q) {
            if (block != nullptr) {
              asm volatile("bar.sync %0, 128;\n" ::"r"(2 + consumer) : "memory");  // the previous slice is read
              // The warp's 16 m × 64 n are 16 matrices of 8 × 8 (column group j8, row half h), stored transposed:
              // matrix (j8, h) becomes n-rows j8·8 … +7, each 16 bytes of m = 16·warp + 8·h …, chunk 2·warp + h.
#pragma unroll
              for (int j2 = 0; j2 < 4; ++j2) {
                uint32_t r[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                  const int j8 = 2 * j2 + i / 2, h = i % 2, a = (q * 8 + j8) * 4 + h * 2;
                  r[i] = pack2<OutT>(acc[a], acc[a + 1]);
                }
                const int mi = lane / 8, n = (2 * j2 + mi / 2) * 8 + lane % 8, chunk = 2 * warp + mi % 2;
                stmatrix_x4<true>(smem_u32(block) + n * 128 + ((chunk ^ (n % 8)) << 4), r[0], r[1], r[2], r[3]);
              }
              asm volatile("bar.sync %0, 128;\n" ::"r"(2 + consumer) : "memory");  // the slice is staged
            }
#pragma unroll
            for (int it = 0; it < 4; ++it) {
              const int n_row = tid / 8 + 16 * it, c = tid % 8;
              const int64_t n = tile.n0 + q * 64 + n_row, m = m_base + c * 8;
              if (n < p.N && m < p.M) {
                uint4 v = make_uint4(0, 0, 0, 0);  // no k-steps (an empty group): zeros
                if (block != nullptr) v = *reinterpret_cast<const uint4*>(block + n_row * 128 + ((c ^ (n_row % 8)) << 4));
                *reinterpret_cast<uint4*>(c_group + n * p.ldc + m) = v;
              }
            }
          }
          tile_clock.lap(kTlEpilogue);
          if (tile.k_tiles > 0) release(prev_stage);
          continue;
        }
      }
      // This consumer's half of the last stage's A tile is dead (its wgmmas are complete): the warps stage
      // their output slices there and hand the stage back afterwards. The producer meanwhile fills the
      // other stages with the next tile. (No k-steps, an empty reduction: zeros, stored without staging.)
      using Sl = Slice<OutT>;
      static_assert(4 * Sl::kBytes <= (kBM / 2) * 128, "a warpgroup's staging fits its half of the A tile");
      uint8_t* staging = nullptr;
      if (tile.k_tiles > 0)
        staging = smem + prev_stage * Cfg::kStageBytes + consumer * (kBM / 2) * 128 + warp * Sl::kBytes;
      constexpr int G = Sl::kCols / 8;  // column groups per slice
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        auto pair = [&](int j) { return make_float2(acc[j * 4 + h * 2], acc[j * 4 + h * 2 + 1]); };
        if constexpr (kKind == GemmKind::nt && kGated) {
          // Gate (column groups < BN/16) and up (the rest) of act columns n0 + …; act from their stored values.
          const int64_t I = p.N / 2;
          const int64_t act_row = out_off[h] < 0 ? -1 : act_off[h];
#pragma unroll
          for (int q = 0; q < (BN / 2) / Sl::kCols; ++q) {
            const int64_t col0 = tile.n0 + q * Sl::kCols;
            auto gate = [&](int jj) { return pair(q * G + jj); };
            auto up = [&](int jj) { return pair(q * G + jj + BN / 16); };
            auto act = [&](int jj) {
              const float2 g = gate(jj), u = up(jj);
              return make_float2(act::silu(to_f32(from_f32<OutT>(g.x))) * to_f32(from_f32<OutT>(u.x)),
                                 act::silu(to_f32(from_f32<OutT>(g.y))) * to_f32(from_f32<OutT>(u.y)));
            };
            if (p.C != nullptr) {  // null: act only (an inference forward keeps no Y1)
              store_slice<OutT>(staging, lane, gate, out_off[h], p.C, col0, I, false);
              store_slice<OutT>(staging, lane, up, out_off[h], p.C + I, col0, I, false);
            }
            store_slice<OutT>(staging, lane, act, act_row, p.act, col0, I, false);
          }
        } else {
          const float scale = row_scale[h];
          const SliceRows rows = slice_rows(lane, out_off[h]);
#pragma unroll
          for (int q = 0; q < BN / Sl::kCols; ++q) {
            auto scaled = [&](int jj) {
              const float2 v = pair(q * G + jj);
              return make_float2(v.x * scale, v.y * scale);
            };
            store_slice<OutT>(staging, lane, scaled, rows, p.C, tile.n0 + q * Sl::kCols, p.N, p.accumulate);
          }
        }
      }
      tile_clock.lap(kTlEpilogue);
      if (tile.k_tiles > 0) release(prev_stage);
    }
  }
  tile_clock.flush(timeline_slot);
  // The peer still arrives on this CTA's barriers until its last stage is released: neither CTA may exit first.
  if constexpr (kCluster > 1) cluster_sync();
}

#ifdef FUSEDMOE_SM90_TIMELINE
// Prints the diagnostic timeline at process exit (registered at the first launch, so before the CUDA runtime's
// own teardown): per kernel family, the tiles, k-steps per tile and cycles per tile of each phase.
void report_timeline() {
  static unsigned long long h[kTimelineSlots][kTlFields];
  if (cudaMemcpyFromSymbol(h, g_timeline, sizeof(h)) != cudaSuccess) return;
  static const char* kinds[] = {"nt", "nn", "tn"};
  std::fprintf(stderr, "sm90 timeline (cycles per tile; consumer warpgroups, producer thread 0; the tile switch is the "
               "consumers' work between a tile's epilogue and the next tile's wait for its first stage):\n");
  for (int slot = 0; slot < kTimelineSlots; ++slot) {
    const unsigned long long* v = h[slot];
    if (v[kTlTiles] == 0) continue;
    const double n = static_cast<double>(v[kTlTiles]);
    std::fprintf(stderr, "  %s%s out%d BN%d%s: tiles %llu, k-steps/tile %.2f, tile switch %.0f, first-stage wait %.0f, "
                 "mainloop %.0f (%.0f per k-step), epilogue %.0f; producer free-stage waits %.0f per tile\n",
                 kinds[slot / 16], slot & 8 ? " gated" : "", slot & 4 ? 32 : 16, slot & 2 ? 128 : 256,
                 slot & 1 ? " Ct" : "", v[kTlTiles], v[kTlKSteps] / n, v[kTlSwitch] / n, v[kTlFirstWait] / n,
                 v[kTlMainloop] / n,
                 v[kTlMainloop] / static_cast<double>(v[kTlKSteps] ? v[kTlKSteps] : 1), v[kTlEpilogue] / n,
                 v[kTlProducerWait] / (n / 2));
  }
}
void register_timeline_report() {
  static const bool registered = [] { return std::atexit(report_timeline) == 0; }();
  (void)registered;
}
#endif

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }


// The weight operand as a 3-D tensor (contiguous dim, rows, groups), boxes of one 128-byte-swizzled panel
// width: nt reads [N rows × K] K-major boxes of BN/parts rows (the weight tile's parts, see kParts), nn reads
// [K rows × N] boxes of 64 × 64.
// Per-group bounds make rows and columns past a group's weight read as zeros.
template <class T, class OutT>
CUtensorMap weight_tensor_map(const Problem<T, OutT>& p, GemmKind kind, int64_t groups, int BN, int parts) {
  const bool nt = kind == GemmKind::nt;
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(nt ? p.K : p.N), static_cast<cuuint64_t>(nt ? p.N : p.K),
                              static_cast<cuuint64_t>(groups)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(p.ldb) * sizeof(T),
                                 static_cast<cuuint64_t>(p.b_group_stride) * sizeof(T)};
  const cuuint32_t box[3] = {64, static_cast<cuuint32_t>(nt ? BN / parts : 64), 1};
  return encode_tensor_map(p.B, dims, strides, box, "sm90 gemm weight");
}

// tn: the operand read in expert order as a tensor (columns, routed rows, 1: three dimensions, as the kernel's
// one TMA load instruction takes), boxes of one 64-row × 64-column panel (the MN-major layout).
template <class T>
CUtensorMap routed_rows_tensor_map(const T* base, int64_t cols, int64_t ld, int64_t rows) {
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows), 1};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(ld) * sizeof(T), static_cast<cuuint64_t>(ld * rows) * sizeof(T)};
  const cuuint32_t box[3] = {64, 64, 1};
  return encode_tensor_map(base, dims, strides, box, "sm90 gemm dW operand");
}

// FUSEDMOE_SM90_TN_TMA=0: the dW GEMMs copy both operands with cp.async (and compute dW1 untransposed).
bool tn_tma_off() {
  static const bool off = env_equals("FUSEDMOE_SM90_TN_TMA", "0");
  return off;
}

// Launches one instantiation; false (nothing launched) when the device cannot hold one of its clusters.
template <class T, class OutT, int BN, GemmKind kKind, bool kGated, int kCluster>
bool launch(const Problem<T, OutT>& p, int64_t groups, int64_t M_total, int sms, cudaStream_t stream) {
  using Cfg = Config<BN>;
  auto kernel = gemm_sm90_kernel<T, OutT, BN, kKind, kGated, kCluster>;
  const size_t smem = Cfg::smem_bytes(static_cast<int>(groups));
  cudaLaunchConfig_t config{};
  cudaLaunchAttribute cluster{};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = kCluster, cluster.val.clusterDim.y = 1, cluster.val.clusterDim.z = 1;
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &cluster;
  config.numAttrs = 1;
  allow_dynamic_smem<gemm_sm90_kernel<T, OutT, BN, kKind, kGated, kCluster>>(Cfg::smem_bytes(kMaxGroups));
  // Work units run at once: one per SM, or for pairs the clusters that fit (some SMs may be left over
  // where a GPC's SM count is odd).
  int resident = sms;
  if constexpr (kCluster > 1) {
    static const int resident_clusters = [&] {
      cudaLaunchConfig_t query = config;
      query.gridDim = dim3(kCluster * sms);
      query.dynamicSmemBytes = Cfg::smem_bytes(kMaxGroups);
      int n = 0;
      check_cuda(cudaOccupancyMaxActiveClusters(&n, kernel, &query), "cudaOccupancyMaxActiveClusters (sm90 gemm)");
      return n;
    }();
    if (resident_clusters == 0) return false;
    resident = resident_clusters;
  }
  const int64_t n_tiles = column_tiles<BN, kGated>(p);
  // exact for tn; for nt/nn an upper bound (each group adds at most one partial m-tile, and for clusters at most
  // one partly empty unit)
  int64_t units;
  if constexpr (kKind == GemmKind::tn)
    units = groups * ((p.M + kBM - 1) / kBM) * n_tiles;
  else
    units = ((M_total + kBM - 1) / kBM + std::max(2, kCluster + 1) * std::min<int64_t>(groups, M_total) + kCluster - 1) /
            kCluster * n_tiles;
  if (units == 0) return true;
  if (units >= (int64_t{1} << 31)) return false;  // tile indices are decoded in 32 bits (TileDivs)
  config.gridDim = dim3(static_cast<unsigned>(kCluster * std::min<int64_t>(units, resident)));
  // tn: TMA for an operand read in expert order, the wider one (B) where both are (FUSEDMOE_SM90_TN_TMA=0: none).
  int tn_tma = kTnTmaNone;
  if (kKind == GemmKind::tn && !tn_tma_off())
    tn_tma = p.b_map == RowMap::identity ? kTnTmaB : p.a_map == RowMap::identity ? kTnTmaA : kTnTmaNone;
  CUtensorMap b_map{};
  if constexpr (kKind != GemmKind::tn) b_map = weight_tensor_map(p, kKind, groups, BN, std::max(kCluster, 2));
  else if (tn_tma == kTnTmaA) b_map = routed_rows_tensor_map(p.A, p.M, p.lda, M_total);
  else if (tn_tma == kTnTmaB) b_map = routed_rows_tensor_map(p.B, p.N, p.ldb, M_total);
  static const int variant = [] {
    const char* v = std::getenv("FUSEDMOE_SM90_VARIANT");
    return v ? std::atoi(v) : 0;
  }();
#ifdef FUSEDMOE_SM90_TIMELINE
  register_timeline_report();
#endif
  const int kernel_variant =
      (variant & kDiagTnOnly) && kKind != GemmKind::tn ? variant & ~(kDiagNoStore | kDiagNoA) : variant;
  // Dynamic units (nt/nn): the clusters take their units after the first from a counter as they finish one, so
  // that the units sharing a weight tile (neighbours in the unit order) run at nearly the same time and find it
  // in L2 however far the clusters have drifted apart; with every unit_stride-th unit per cluster they drift by up
  // to a tile. The heuristic takes them where a group's weight is large beside L2 (50 MB) and the clusters have
  // several tiles each (the counter's memset then costs little). Measured on an H200 (NOTES, session 21): at
  // Qwen3-235B-A22B (T=16384), GEMM1 with its 25 MB per expert read 10.4 -> 6.1 GB from DRAM and ran 5.38 ->
  // 5.21 ms (the clock rose 1.60 -> 1.64 GHz under the power limit), dX 5.20 -> 5.12; with 12.6 MB (235B's GEMM2
  // and dA) and 3–6 MB (Qwen3-30B-A3B) level to 1.7% slower, as the take costs a little per tile and L2 already
  // held the weights. The protocol needs every tile to span at least S stages (the unit barrier's phases).
  // FUSEDMOE_SM90_DYNAMIC=0 / 1: off / on wherever the protocol allows.
  static const int dynamic_env = env_equals("FUSEDMOE_SM90_DYNAMIC", "0") ? 0
                                 : env_equals("FUSEDMOE_SM90_DYNAMIC", "1") ? 1
                                                                            : -1;
  constexpr int64_t kLargeGroupWeight = int64_t{16} << 20;  // bytes
  const int64_t clusters = config.gridDim.x / kCluster;
  const bool heuristic_dynamic =
      p.N * p.K * static_cast<int64_t>(sizeof(T)) >= kLargeGroupWeight && units >= 8 * clusters;
  const bool dynamic = kKind != GemmKind::tn && (p.K + kBK - 1) / kBK >= Cfg::kStages &&
                       (dynamic_env == 1 || (dynamic_env == -1 && heuristic_dynamic));
  const Scratch pooled_counter(dynamic && p.unit_counter == nullptr ? sizeof(unsigned) : 0, stream);
  unsigned* unit_counter = !dynamic ? nullptr : p.unit_counter != nullptr ? p.unit_counter : pooled_counter.as<unsigned>();
  if (dynamic) check_cuda(cudaMemsetAsync(unit_counter, 0, sizeof(unsigned), stream), "cudaMemsetAsync (unit counter)");
  check_cuda(cudaLaunchKernelEx(&config, kernel, p, units, b_map, kernel_variant, tn_tma, unit_counter),
             "gemm_sm90_kernel");
  return true;
}

// The instantiation for a runtime tile width (128 or 256) and cluster size (1, 2 or, for 256 columns, 4; tn: 1).
template <class T, class OutT, GemmKind kKind, bool kGated>
bool launch_tile(const Problem<T, OutT>& p, int block_n, int cluster, int64_t groups, int64_t M_total, int sms,
                 cudaStream_t stream) {
  if constexpr (kKind == GemmKind::tn) {
    return block_n == 256 ? launch<T, OutT, 256, kKind, kGated, 1>(p, groups, M_total, sms, stream)
                          : launch<T, OutT, 128, kKind, kGated, 1>(p, groups, M_total, sms, stream);
  } else {
    if (block_n == 256)
      return cluster == 4   ? launch<T, OutT, 256, kKind, kGated, 4>(p, groups, M_total, sms, stream)
             : cluster == 2 ? launch<T, OutT, 256, kKind, kGated, 2>(p, groups, M_total, sms, stream)
                            : launch<T, OutT, 256, kKind, kGated, 1>(p, groups, M_total, sms, stream);
    return cluster >= 2 ? launch<T, OutT, 128, kKind, kGated, 2>(p, groups, M_total, sms, stream)
                        : launch<T, OutT, 128, kKind, kGated, 1>(p, groups, M_total, sms, stream);
  }
}

}  // namespace
}  // namespace sm90

template <class T, class OutT>
bool launch_sm90(const Problem<T, OutT>& p, GemmKind kind, int64_t groups, int64_t M_total, const GemmTiling& tiling,
                 cudaStream_t stream) {
  using namespace sm90;
  // FUSEDMOE_PORTABLE_GEMM switches the heuristic to the portable kernel; an explicit wgmma choice still runs.
  static const bool disabled = std::getenv("FUSEDMOE_PORTABLE_GEMM") != nullptr;
  if ((disabled && tiling.kernel == GemmKernel::automatic) || groups > kMaxGroups) return false;
  const DeviceInfo device = current_device_info();
  if (!device.sm90) return false;
  const int sms = device.sms;
  // 16-byte chunks everywhere: rows, sizes and bases aligned (the zero-fill works at chunk granularity).
  const int64_t chunk_dims[] = {p.lda, p.ldb, p.ldc, p.N, kind == GemmKind::tn ? p.M : p.K,
                                kind == GemmKind::tn ? 0 : p.b_group_stride, kind == GemmKind::tn ? p.c_group_stride : 0};
  for (int64_t d : chunk_dims)
    if (d % 8 != 0) return false;
  if (!aligned16(p.A) || !aligned16(p.B) || !aligned16(p.C)) return false;
  if (p.a_k_split && (kind != GemmKind::nt || p.a_map != RowMap::identity || p.act != nullptr)) return false;
  // SiLU·mul in GEMM1's epilogue; FUSEDMOE_FUSED_SILU=0 runs it as a separate pass instead.
  static const bool fuse_silu = !env_equals("FUSEDMOE_FUSED_SILU", "0");
  if (p.act != nullptr && !fuse_silu) return false;
  if (p.act != nullptr &&  // gated: y rows in expert order, act rows 16-byte aligned, halves of whole chunks
      (kind != GemmKind::nt || p.c_map != RowMap::identity || p.row_scale != nullptr || p.N % 16 != 0 ||
       p.ld_act % 8 != 0 || !aligned16(p.act)))
    return false;
  // The heuristic (where the tiling leaves a field at 0): 128 × 256 tiles where the output is at least that
  // wide (fewer operand bytes per FLOP), else 128 × 128; weight-multicast pairs where the groups average at
  // least one full m-tile (128 rows), single CTAs elsewhere and for a single problem (the router's GEMM, 9% slower
  // in pairs). Measured on the H200 at Qwen3-30B-A3B shapes (NOTES, sessions 15–16), pairs against single CTAs:
  // T=16384 (1024 rows per expert) GEMM1 −2%, dA and dX −3% (the multicast's lower L2 and DRAM traffic lets the
  // clock rise under the power limit); T=4096 (256 rows) GEMM1 −4%, GEMM2 −3%, dA −16%, dX −4%, forward −2%,
  // backward −3%; T=2048 (128 rows, where pairs mostly split the groups' single m-tile by n-tile) forward and
  // backward −4%. FUSEDMOE_SM90_BN=128 and FUSEDMOE_SM90_CLUSTER=1, 2 or 4 change it.
  // Quads (4; 128 × 256 tiles only, else pairs) are never the heuristic: an H200 holds only 30 clusters of four
  // (120 of its 132 SMs), and although they run at a higher clock (GEMM1 1.65 -> 1.74 GHz) they lose 4–8%
  // (NOTES, session 16).
  static const bool narrow_only = env_equals("FUSEDMOE_SM90_BN", "128");
  static const int cluster_env = env_equals("FUSEDMOE_SM90_CLUSTER", "4")   ? 4
                                 : env_equals("FUSEDMOE_SM90_CLUSTER", "2") ? 2
                                 : env_equals("FUSEDMOE_SM90_CLUSTER", "1") ? 1
                                                                            : 0;
  auto block_n_for = [&](int64_t N) { return tiling.block_n != 0 ? tiling.block_n : narrow_only ? 128 : default_block_n(N); };
  const int block_n = block_n_for(p.N);
  const bool deep_groups = groups > 1 && M_total >= kBM * groups;
  const bool heuristic_pairs = tiling.cluster_m == 0 && cluster_env == 0 && deep_groups;
  const int cluster = tiling.cluster_m != 0 ? tiling.cluster_m : cluster_env != 0 ? cluster_env : heuristic_pairs ? 2 : 1;
  auto launch_nt_nn = [&](int c) {
    if (kind == GemmKind::nn) return launch_tile<T, OutT, GemmKind::nn, false>(p, block_n, c, groups, M_total, sms, stream);
    return p.act != nullptr ? launch_tile<T, OutT, GemmKind::nt, true>(p, block_n, c, groups, M_total, sms, stream)
                            : launch_tile<T, OutT, GemmKind::nt, false>(p, block_n, c, groups, M_total, sms, stream);
  };
  switch (kind) {
    case GemmKind::nt:
    case GemmKind::nn:
      // Pairs the heuristic chose that cannot be resident (no two-CTA cluster fits the GPU's partition) fall back
      // to single CTAs rather than to the portable kernel.
      return launch_nt_nn(cluster) || (heuristic_pairs && launch_nt_nn(1));
    case GemmKind::tn:
      if constexpr (sizeof(OutT) == 2) {
        // dW1 (A in expert order, B gathered): computed transposed, Cᵀ = Bᵀ·A, so that the operand read in expert
        // order is the wider B tile (BN columns) and comes by TMA. (H100, T=16384: dW1 1940 -> 1630 µs.)
        if (p.a_map == RowMap::identity && p.b_map != RowMap::identity && !p.accumulate && !tn_tma_off()) {
          Problem<T, OutT> t = p;
          std::swap(t.A, t.B), std::swap(t.lda, t.ldb), std::swap(t.a_map, t.b_map), std::swap(t.M, t.N);
          t.c_transposed = true;
          return launch_tile<T, OutT, GemmKind::tn, false>(t, block_n_for(t.N), 1, groups, M_total, sms, stream);
        }
      }
      return launch_tile<T, OutT, GemmKind::tn, false>(p, block_n, 1, groups, M_total, sms, stream);
  }
  return false;
}

template bool launch_sm90(const Problem<__nv_bfloat16, __nv_bfloat16>&, GemmKind, int64_t, int64_t, const GemmTiling&,
                           cudaStream_t);
template bool launch_sm90(const Problem<__nv_bfloat16, float>&, GemmKind, int64_t, int64_t, const GemmTiling&,
                           cudaStream_t);
template bool launch_sm90(const Problem<__half, __half>&, GemmKind, int64_t, int64_t, const GemmTiling&,
                           cudaStream_t);
template bool launch_sm90(const Problem<__half, float>&, GemmKind, int64_t, int64_t, const GemmTiling&,
                           cudaStream_t);

}  // namespace fusedmoe::detail::cuda
