// A synthetic grouped-GEMM mainloop, to predict a schedule before building it into gemm_sm90.cu.
//
// Same operand paths as the real nt kernel: a producer warpgroup fills stages (the weight tile by TMA in two
// 128-byte-swizzled boxes, the 128 A rows by 16-byte cp.async, optionally gathered through a row list), consumers
// wait, run wgmma from shared memory and hand the stage back; a tile's output (bf16) leaves from registers as
// coalesced 16-byte stores (the real epilogue stages through shared memory to reach the same coalescing). What it
// leaves out: the real epilogue's row lookups, staging and scaling, and the expert boundaries inside m-tiles.
//
// Schedules:
//   cooperative 128 × BN: both consumer warpgroups share each tile (64 rows each) and each stage; the epilogue is
//     serial to the mainloop (what gemm_sm90 does today, BN = 256).
//   cooperative3 192 × BN: three consumer warpgroups share each 192-row tile (cuBLAS's 192 × 192 shape at BN = 192:
//     96 accumulators a thread, so the consumers fit 152 registers after setmaxnreg), 11% fewer operand bytes into
//     the SM per output than 128 × 256 (run with the argument `tiles`, against 128 × 256 on shapes both divide).
//   ping-pong 128 × BN: each consumer warpgroup owns every other tile of the CTA, all 128 rows (two m64nBNk16 per
//     16-deep step); stages are consumed in tile order, so while one warpgroup stores its tile the other runs its
//     mainloop (bench/micro/wgmma_rate.cu measured that one warpgroup alone reaches the full tensor rate and that
//     the other's stores do not slow it). BN = 192 needs 192 accumulators: the consumers take 232 registers from
//     the producer's share (setmaxnreg).
//
// Reports, per schedule and problem, the kernel time (events), TFLOP/s and the tensor-core share of the whole
// kernel, and the cycles per 64-deep k-step of a tile including its share of the epilogue.
// With the argument `intake`: the stages' fill rate alone (no wgmma), in bytes per SM clock, weights and rows
// together and each on its own, beside the mainloop with wgmma.
// Build and run: scripts/gpu_micro.sh (it runs both microbenchmarks).
#include <cuda.h>
#include <cuda_bf16.h>

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "../../src/activation.hpp"
#include "../../src/cuda/sm90_epilogue.cuh"
#include "../../src/cuda/sm90_primitives.cuh"
#include "../../src/cuda/sm90_tensor_map.cuh"
#include "../../src/cuda/wgmma.cuh"

using namespace fusedmoe::detail::cuda::sm90;
using bf16 = __nv_bfloat16;
constexpr int64_t kNoColumnLimit = int64_t{1} << 62;  // store_slice's column bound: none here

namespace {

enum Schedule : int { kCooperative = 0, kPingPong = 1, kCooperative3 = 2 };

template <int kSched> constexpr int kTileRows = kSched == kCooperative3 ? 192 : 128;
template <int kSched> constexpr int kConsumers = kSched == kCooperative3 ? 3 : 2;  // consumer warpgroups

template <int BN, int BM = 128>
struct Cfg {
  static constexpr int kABytes = BM * 128, kBBytes = BN * 128, kStageBytes = kABytes + kBBytes;
  static constexpr int kStages = (200 * 1024) / kStageBytes;  // 4 (BN 256; 192 × 192), 5 (192), 6 (128)
  static constexpr int kSmemBytes = kStages * kStageBytes + 2 * 8 * kStages + 1024;
};

// How a tile's bf16 output leaves (the epilogue). kTileBlocks writes each tile as one contiguous block (no real
// layout: the cheapest pattern); the others write the real [rows, N] row-major output, row i of the tile at output
// row out_rows[i] (null: i itself; GEMM2 writes slot rows, a permutation).
enum StoreMode : int {
  kNoStores = 0,
  kTileBlocks = 1,   // 16-byte chunk j of thread x at (j·threads + x)·16 of the tile's block
  kRowSegments = 2,  // 32 lanes store one row's 512 contiguous bytes per instruction (from registers, no staging)
  kStagedSlices = 3, // as gemm_sm90's store_slice: per warp 8 rows × 128 bytes staged by stmatrix (padded rows),
                     // __syncwarp, read back, four 128-byte row pieces per store instruction
  kGatedSlices = 4,  // GEMM1's training epilogue: gate and up to Y1, silu(gate)·up to act (96 KB a 128 x 256 tile)
  // Parts of it, to see what its time is made of:
  kGateUpOnly = 5,   // gate and up only (64 KB, no act)
  kGatedNoSilu = 6,  // all three, act = gate·up (no σ)
  kActOnly = 7,      // act only (the inference form: 32 KB and σ)
  // Layouts the block could choose for its own buffers:
  kGatedInterleaved = 8,  // Y1 as blocks of [128 gate | 128 up] columns per tile (one 512-byte piece per row)
  kGatedBlocked = 9,      // that, and act as [N/256 column blocks][rows][128] (each tile's act one 32 KB block)
};

struct Problem {
  const bf16* A;            // [rows, K]
  const int32_t* gather;    // A row of routed row i (null: i itself)
  bf16* out;                // kTileBlocks: one 128 × BN block per tile; else [rows, N]
  const int32_t* out_rows;  // output row of routed row i (null: i itself)
  bf16* act;                // kGatedSlices: [rows, N/2]
  int experts, rows_per_expert, N, K;
};

// The operand intake alone (argument `intake`): no wgmma, the consumers hand each stage back as soon as it is full,
// so a k-step takes what filling a stage takes. kIntakeBoth: the weight tile by TMA and the A rows by cp.async;
// kIntakeWeights: the TMA boxes only; kIntakeRows: the cp.async rows only.
enum Intake : int { kMma = 0, kIntakeBoth = 1, kIntakeWeights = 2, kIntakeRows = 3 };

template <int BN, int kSched, int kStore, int kIntake = kMma>
__global__ void __launch_bounds__(128 * (1 + kConsumers<kSched>), 1)
    pipeline_kernel(const __grid_constant__ CUtensorMap w_map, Problem p, long long* cycles) {
  constexpr int kBM = kTileRows<kSched>;
  static_assert(kSched != kCooperative3 || kStore == kNoStores || kStore == kStagedSlices,
                "192-row tiles: the plain store patterns only");
  using C = Cfg<BN, kBM>;
  constexpr int S = C::kStages;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  const uint32_t stages = smem_u32(smem), full_bar = stages + S * C::kStageBytes, empty_bar = full_bar + 8 * S;
  const int warpgroup = threadIdx.x / 128, tid = threadIdx.x % 128;
  if (threadIdx.x == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(full_bar + 8 * s, 128 + 1);                           // 128 noinc cp.async arrivals + expect_tx
      mbar_init(empty_bar + 8 * s, kSched == kPingPong ? 4 : 4 * kConsumers<kSched>);  // the consuming warps
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  const int m_tiles = p.rows_per_expert / kBM, n_tiles = (p.N + BN - 1) / BN, k_tiles = p.K / 64;
  const int tiles = p.experts * m_tiles * n_tiles;
  auto decode = [&](int t, int& e, int& m0, int& n0) {  // m-tiles fastest: neighbouring CTAs share a weight tile
    e = t / (m_tiles * n_tiles);
    const int r = t % (m_tiles * n_tiles);
    m0 = (r % m_tiles) * kBM, n0 = (r / m_tiles) * BN;
  };
  // Ping-pong at BN = 192 needs more than the 168 registers a 384-thread launch gives every thread, and three
  // consumers more than the 128 of a 512-thread launch (56 + 3 × 152 = 512 per thread quadruple: the pool).
  // (0: no move; setmaxnreg takes its count as an immediate.) Three consumers: 56 for the producer's 12 row offsets.
  constexpr int kProducerRegs = kSched == kCooperative3 ? 56 : kSched == kPingPong && BN > 128 ? 40 : 0;
  constexpr int kConsumerRegs = kSched == kCooperative3 ? 152 : kSched == kPingPong && BN > 128 ? 232 : 0;
  if (warpgroup == 0) {
    if constexpr (kProducerRegs > 0) asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kProducerRegs));
    int stage = 0;
    uint32_t phase = 0;
    for (int t = blockIdx.x; t < tiles; t += gridDim.x) {
      int e, m0, n0;
      decode(t, e, m0, n0);
      int64_t row_off[kBM / 16];
#pragma unroll
      for (int i = 0; i < kBM / 16; ++i) {
        const int64_t r = static_cast<int64_t>(e) * p.rows_per_expert + m0 + tid / 8 + 16 * i;
        row_off[i] = (p.gather ? p.gather[r] : r) * p.K;
      }
      for (int kt = 0; kt < k_tiles; ++kt) {
        mbar_wait(empty_bar + 8 * stage, phase ^ 1);
        const uint32_t a_dst = stages + stage * C::kStageBytes, b_dst = a_dst + C::kABytes;
        if (tid == 0) {
          if constexpr (kIntake == kIntakeRows) {
            mbar_arrive(full_bar + 8 * stage);
          } else {
            mbar_arrive_expect_tx(full_bar + 8 * stage, C::kBBytes);
            for (int half = 0; half < 2; ++half)
              tma_load<1>(b_dst + half * (BN / 2) * 128, &w_map, full_bar + 8 * stage, kt * 64, n0 + half * (BN / 2), e);
          }
        }
        if constexpr (kIntake != kIntakeWeights) {
#pragma unroll
          for (int i = 0; i < kBM / 16; ++i) {
            const int row = tid / 8 + 16 * i, c = tid % 8;
            cp_async_16(a_dst + row * 128 + ((c ^ (row & 7)) << 4), p.A + row_off[i] + kt * 64 + c * 8, true);
          }
        }
        asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(full_bar + 8 * stage) : "memory");
        if (++stage == S) stage = 0, phase ^= 1;
      }
    }
    return;
  }
  if constexpr (kConsumerRegs > 0) asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kConsumerRegs));
  const int consumer = warpgroup - 1, warp = tid / 32, lane = tid % 32;
  constexpr int kAcc = kSched == kPingPong ? BN : BN / 2;  // a warpgroup's 64 (ping-pong 128) rows × BN
  float acc[kAcc];
  auto release = [&](int s) {
    __syncwarp();
    if (lane == 0) mbar_arrive(empty_bar + 8 * s);
  };
  const long long t0 = clock64();
  uint64_t ns0;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns0));
  long long ksteps_done = 0;
  int local = 0;  // the CTA's tile count so far (ping-pong: whose turn)
  const int local_tiles = (tiles - static_cast<int>(blockIdx.x) + static_cast<int>(gridDim.x) - 1) / static_cast<int>(gridDim.x);
  for (int t = blockIdx.x; t < tiles; t += gridDim.x, ++local) {
    if (kSched == kPingPong && local % 2 != consumer) continue;
    // Ping-pong: a warpgroup starts waiting on its tile's stages only once the other has seen its own tile's last
    // stage full. A parity wait tells the two phases apart only one phase ahead; without this turn the second
    // warpgroup took stage 0's first fill for its own (two phases on) and the pipeline deadlocked. Named barrier
    // 1 + c: the other warpgroup arrives, warpgroup c waits (256 threads).
    if (kSched == kPingPong && local > 0) asm volatile("bar.sync %0, 256;\n" ::"r"(1 + consumer) : "memory");
#pragma unroll
    for (int i = 0; i < kAcc; ++i) acc[i] = 0.f;
    int prev_stage = 0;
    for (int kt = 0; kt < k_tiles; ++kt) {
      const long long g = static_cast<long long>(local) * k_tiles + kt;  // the CTA's k-steps so far, in fill order
      const int stage = static_cast<int>(g % S);
      mbar_wait(full_bar + 8 * stage, static_cast<uint32_t>((g / S) & 1));
      if constexpr (kIntake != kMma) {
        release(stage);  // intake only: the stage is free again as soon as it is full
        continue;
      }
      fence_proxy_async();
      const uint32_t a = stages + stage * C::kStageBytes, b = a + C::kABytes;
      wgmma_fence();
#pragma unroll
      for (int k16 = 0; k16 < 4; ++k16) {
        const uint64_t db = smem_desc(b + k16 * 32, 16, 1024);
        if constexpr (kSched != kPingPong) {
          Wgmma<bf16, BN>::template mma<0, 0>(acc, smem_desc(a + consumer * 64 * 128 + k16 * 32, 16, 1024), db);
        } else {
          auto& lo = *reinterpret_cast<float(*)[BN / 2]>(acc);
          auto& hi = *reinterpret_cast<float(*)[BN / 2]>(acc + BN / 2);
          Wgmma<bf16, BN>::template mma<0, 0>(lo, smem_desc(a + k16 * 32, 16, 1024), db);
          Wgmma<bf16, BN>::template mma<0, 0>(hi, smem_desc(a + 64 * 128 + k16 * 32, 16, 1024), db);
        }
      }
      wgmma_commit();
      if (kSched == kPingPong && kt == k_tiles - 1 && local + 1 < local_tiles)
        asm volatile("bar.arrive %0, 256;\n" ::"r"(1 + (1 - consumer)) : "memory");  // the other's turn
      wgmma_wait<1>();
      if (kt > 0) release(prev_stage);
      prev_stage = stage;
    }
    wgmma_wait<0>();
    pin_registers(acc);
    ksteps_done += k_tiles;
    if constexpr (kIntake != kMma) continue;  // (every stage already released)
    constexpr int kThreads = kSched == kPingPong ? 128 : 128 * kConsumers<kSched>;
    const int thread = kSched == kPingPong ? tid : consumer * 128 + tid;
    int e, m0, n0;
    decode(t, e, m0, n0);
    const int64_t tile_row0 = static_cast<int64_t>(e) * p.rows_per_expert + m0;
    auto out_row = [&](int m) { const int64_t i = tile_row0 + m; return p.out_rows ? p.out_rows[i] : i; };
    if constexpr (kStore == kRowSegments) {
      // The tile's 128 rows × BN columns in row pieces of 512 bytes (BN/2 ... one instruction of the warp each).
      constexpr int kPieces = BN * 2 / 512 > 0 ? BN * 2 / 512 : 1, kPieceCols = BN / kPieces;
      static_assert(kPieceCols == 256 || kPieceCols == 192 || kPieceCols == 128, "row piece of 32 lanes");
      const int lane_col = (thread % 32) * 8;  // 8 bf16 per lane
      constexpr int kSegs = 128 * kPieces, kPerThread = kSegs / (kThreads / 32);
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) {
        const int seg = j * (kThreads / 32) + thread / 32, m = seg / kPieces, piece = seg % kPieces;
        const float* v = acc + (j * 8) % kAcc;
        uint32_t w[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const __nv_bfloat162 b2 = __floats2bfloat162_rn(v[2 * q], v[2 * q + 1]);
          w[q] = *reinterpret_cast<const uint32_t*>(&b2);
        }
        if (lane_col < kPieceCols)
          *reinterpret_cast<uint4*>(p.out + out_row(m) * p.N + n0 + piece * kPieceCols + lane_col) =
              make_uint4(w[0], w[1], w[2], w[3]);
      }
    } else if constexpr (kStore == kStagedSlices) {
      // gemm_sm90's epilogue (store_slice) for this warp's 16 rows: slices of 8 rows × 64 columns through a
      // 1152-byte area per warp in the tile's last stage (its A part).
      uint8_t* area = smem + prev_stage * C::kStageBytes + (thread / 32) * Slice<bf16>::kBytes;
      const int lane = tid % 32;
      constexpr int kGroups = kSched == kPingPong ? 2 : 1;  // ping-pong: rows 0-63 (lo) and 64-127 (hi)
#pragma unroll
      for (int grp = 0; grp < kGroups; ++grp) {
        const float* a = acc + grp * (BN / 2);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int m = (kSched == kPingPong ? grp * 64 : consumer * 64) + (thread / 32 % 4) * 16 + lane / 4 + 8 * h;
          const SliceRows rows = slice_rows(lane, out_row(m) * p.N);
#pragma unroll
          for (int q = 0; q < BN / 64; ++q) {
            auto pair = [&](int i) { const int j = q * 8 + i; return make_float2(a[j * 4 + h * 2], a[j * 4 + h * 2 + 1]); };
            store_slice<bf16>(area, lane, pair, rows, p.out + n0 + q * 64, 0, kNoColumnLimit, false);
          }
        }
      }
    } else if constexpr (kStore >= kGatedSlices) {
      // GEMM1's training epilogue: the tile's 128 gate and 128 up columns side by side (gate_up_proj rows
      // interleaved per tile), stored to Y1 (gate half, up half), and act = silu(gate)·up of the rounded values to
      // act [rows, N/2]: three staged slices per 64 act columns, as gemm_sm90 does.
      static_assert(kSched == kCooperative && BN == 256, "the gated pattern of the 128 x 256 kernel");
      uint8_t* area = smem + prev_stage * C::kStageBytes + (thread / 32) * Slice<bf16>::kBytes;
      const int lane = tid % 32, I = p.N / 2, col0 = (n0 / BN) * (BN / 2);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = consumer * 64 + (thread / 32 % 4) * 16 + lane / 4 + 8 * h;
        const int64_t row = out_row(m);
        const SliceRows y1_rows = slice_rows(lane, row * p.N), act_rows = slice_rows(lane, row * I),
                        block_rows = slice_rows(lane, row * (BN / 2));
#pragma unroll
        for (int q = 0; q < BN / 128; ++q) {
          auto gate = [&](int i) { const int j = q * 8 + i; return make_float2(acc[j * 4 + h * 2], acc[j * 4 + h * 2 + 1]); };
          auto up = [&](int i) { return gate(i + BN / 16); };
          auto act = [&](int i) {
            const float2 g = gate(i), u = up(i);
            auto r = [](float x) { return __bfloat162float(__float2bfloat16(x)); };
            if constexpr (kStore == kGatedNoSilu) return make_float2(r(g.x) * r(u.x), r(g.y) * r(u.y));
            return make_float2(fusedmoe::act::silu(r(g.x)) * r(u.x), fusedmoe::act::silu(r(g.y)) * r(u.y));
          };
          if constexpr (kStore == kGatedInterleaved || kStore == kGatedBlocked) {
            store_slice<bf16>(area, lane, gate, y1_rows, p.out + n0 + q * 64, 0, kNoColumnLimit, false);
            store_slice<bf16>(area, lane, up, y1_rows, p.out + n0 + BN / 2 + q * 64, 0, kNoColumnLimit, false);
          } else if constexpr (kStore != kActOnly) {
            store_slice<bf16>(area, lane, gate, y1_rows, p.out + col0 + q * 64, 0, kNoColumnLimit, false);
            store_slice<bf16>(area, lane, up, y1_rows, p.out + I + col0 + q * 64, 0, kNoColumnLimit, false);
          }
          if constexpr (kStore == kGatedBlocked) {
            const int64_t rows = static_cast<int64_t>(p.experts) * p.rows_per_expert;
            bf16* block = p.act + (n0 / BN) * rows * (BN / 2);  // this tile's column block of act
            store_slice<bf16>(area, lane, act, block_rows, block + q * 64, 0, kNoColumnLimit, false);
          } else if constexpr (kStore != kGateUpOnly) {
            store_slice<bf16>(area, lane, act, act_rows, p.act + col0 + q * 64, 0, kNoColumnLimit, false);
          }
        }
      }
    } else if constexpr (kStore == kNoStores) {
      // Keep the accumulators live (ptxas turns wgmmas whose results nobody reads into empty ones).
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < kAcc; ++i) sum += acc[i];
      if (sum == 1234.5f) p.out[thread] = __float2bfloat16(sum);
    } else if constexpr (kStore == kTileBlocks) {
      // The tile's 128 × BN outputs as bf16, coalesced: 16-byte chunk j of this thread at (j·threads + thread)·16.
      constexpr int kChunks = kAcc / 8;
      uint4* dst = reinterpret_cast<uint4*>(p.out + static_cast<int64_t>(t) * 128 * BN);
#pragma unroll
      for (int j = 0; j < kChunks; ++j) {
        uint32_t w[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const __nv_bfloat162 v = __floats2bfloat162_rn(acc[j * 8 + 2 * q], acc[j * 8 + 2 * q + 1]);
          w[q] = *reinterpret_cast<const uint32_t*>(&v);
        }
        dst[j * kThreads + thread] = make_uint4(w[0], w[1], w[2], w[3]);
      }
    }
    release(prev_stage);
  }
  const long long t1 = clock64();
  // Per consumer (three slots a CTA): its cycles and k-steps; after them the SM clock.
  if (tid == 0) cycles[2 * (blockIdx.x * 3 + consumer)] = t1 - t0, cycles[2 * (blockIdx.x * 3 + consumer) + 1] = ksteps_done;
  if (threadIdx.x == 128 && blockIdx.x == 0) {  // the SM clock over the kernel: cycles per nanosecond of CTA 0
    uint64_t ns1;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns1));
    cycles[6 * gridDim.x] = t1 - t0, cycles[6 * gridDim.x + 1] = static_cast<long long>(ns1 - ns0);
  }
  (void)warp;
}

// Operands of random bf16 values in [-1, 1): constant operands draw less power (the tensor cores' inputs do not
// toggle), which lets the clock run higher than under a real workload.
__global__ void fill_random(bf16* x, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n; i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 15, h *= 2246822519u, h ^= h >> 13;
    x[i] = __float2bfloat16(static_cast<float>(h & 0xffff) / 32768.f - 1.f);
  }
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

// The weight [E, N, K] as gemm_sm90 maps it for nt: boxes of 64 reduction columns × box_rows rows.
CUtensorMap weight_map(const bf16* w, int experts, int N, int K, int box_rows) {
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(K), static_cast<cuuint64_t>(N), static_cast<cuuint64_t>(experts)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(K) * 2, static_cast<cuuint64_t>(K) * N * 2};
  const cuuint32_t box[3] = {64, static_cast<cuuint32_t>(box_rows), 1};
  return encode_tensor_map(w, dims, strides, box, "pipeline_rate weight");
}

struct Shape {
  const char* name;
  int experts, rows_per_expert, N, K;
  bool gather;
};

bf16* act_buf = nullptr;  // kGatedSlices' act output

struct Buffers {
  const bf16* A;
  const int32_t *gather, *perm;
  const bf16* W;
  bf16* out;
};

template <int BN, int kSched, int kStore, int kIntake = kMma>
void run(const Shape& sh, const Buffers& buffers, int sms) {
  const bf16* A = buffers.A;
  const int32_t *gather = buffers.gather, *perm = buffers.perm;
  const bf16* W = buffers.W;
  bf16* out = buffers.out;
  constexpr int kBM = kTileRows<kSched>;
  using C = Cfg<BN, kBM>;
  auto kernel = pipeline_kernel<BN, kSched, kStore, kIntake>;
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes), "smem attribute");
  const CUtensorMap map = weight_map(W, sh.experts, sh.N, sh.K, BN / 2);
  // Output rows: GEMM1 writes rows in expert order, GEMM2 slot rows (a permutation of the routed rows).
  const Problem p{A, sh.gather ? gather : nullptr, out, sh.gather ? nullptr : perm, act_buf, sh.experts, sh.rows_per_expert,
                  sh.N, sh.K};
  long long* d_cycles = nullptr;
  const int slots = 6 * sms + 2;  // (see the kernel's end)
  check(cudaMalloc(&d_cycles, sizeof(long long) * slots), "cudaMalloc");
  check(cudaMemset(d_cycles, 0, sizeof(long long) * slots), "cudaMemset");
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  float best = 1e30f;
  for (int rep = 0; rep < 6; ++rep) {  // the first warms up; the best of the rest
    cudaEventRecord(a);
    kernel<<<sms, 128 * (1 + kConsumers<kSched>), C::kSmemBytes>>>(map, p, d_cycles);
    cudaEventRecord(b);
    // A watchdog: a kernel that has not finished in 5 s is hung (a pipeline bug); say which and stop.
    for (int waited_ms = 0; cudaEventQuery(b) == cudaErrorNotReady; ++waited_ms) {
      if (waited_ms > 5000) {
        std::printf("%-8s schedule %d %dx%d: HUNG (no completion in 5 s)\n", sh.name, kSched, kBM, BN);
        std::fflush(stdout);
        std::_Exit(2);
      }
      usleep(1000);
    }
    check(cudaEventSynchronize(b), "kernel");
    float ms = 0.f;
    cudaEventElapsedTime(&ms, a, b);
    if (rep > 0 && ms < best) best = ms;
  }
  std::vector<long long> h(slots);
  check(cudaMemcpy(h.data(), d_cycles, sizeof(long long) * slots, cudaMemcpyDeviceToHost), "copy back");
  const double mhz = 1e3 * static_cast<double>(h[6 * sms]) / std::max(1LL, h[6 * sms + 1]);
  cudaFree(d_cycles);
  long long cyc = 0, ksteps = 0;  // the busiest consumer's cycles, all consumers' k-steps
  for (int i = 0; i < 3 * sms; ++i) cyc = std::max(cyc, h[2 * i]), ksteps += h[2 * i + 1];
  const int consumers = kSched == kPingPong ? 1 : kConsumers<kSched>;  // consumers sharing one tile
  const double tiles_ksteps = static_cast<double>(ksteps) / consumers;
  const double macs = static_cast<double>(kBM) * BN * 64 * tiles_ksteps;
  const double flops = 2.0 * sh.experts * sh.rows_per_expert * static_cast<double>(sh.N) * sh.K;
  const double per_kstep = static_cast<double>(cyc) * sms / tiles_ksteps;  // cycles of one SM per kBM×BN×64 k-step
  static const char* kStoreNames[] = {"no stores", "tile blocks", "row pieces", "staged slices", "gated slices",
                                       "gate+up only", "gated, no σ", "act only", "gated, Y1 interleaved",
                                       "gated, Y1+act blocked"};
  static const char* kScheduleNames[] = {"cooperative", "ping-pong", "cooperative3"};
  if constexpr (kIntake != kMma) {
    static const char* kIntakeNames[] = {"", "weights TMA + rows cp.async", "weights TMA only", "rows cp.async only"};
    const int bytes = (kIntake != kIntakeRows ? C::kBBytes : 0) + (kIntake != kIntakeWeights ? C::kABytes : 0);
    std::printf("%-8s intake %-28s (%s A rows): %8.1f us, %6.1f cycles per %d-byte stage: %5.1f bytes per SM clock, "
                "SM clock %4.0f MHz\n", sh.name, kIntakeNames[kIntake], sh.gather ? "gathered" : "in-order", best * 1e3,
                per_kstep, bytes, bytes / per_kstep, mhz);
    return;
  }
  std::printf("%-8s %-12s %dx%-3d %-21s: %8.1f us %6.1f TFLOP/s  %7.1f cycles per %dx%dx64 k-step incl. epilogue"
              " (ideal %4d): tensor cores %5.1f%% of the busiest SM's time, SM clock %4.0f MHz\n",
              sh.name, kScheduleNames[kSched], kBM, BN, kStoreNames[kStore], best * 1e3, flops / (best * 1e-3) / 1e12,
              per_kstep, kBM, BN, kBM * BN / 32, 100.0 * macs / (2048.0 * cyc * sms), mhz);
}

template <int BN, int kSched, int kStore, int kIntake = kMma>
struct Run {
  static void go(const Shape& sh, const Buffers& b, int sms) { run<BN, kSched, kStore, kIntake>(sh, b, sms); }
};

template <class... Runs>
void run_each(const Shape& sh, const Buffers& b, int sms) {
  (Runs::go(sh, b, sms), ...);
}

}  // namespace

// No argument: the schedules and store patterns at Qwen3-30B-A3B's T=16384 shapes. `tiles`: 128 × 256 (two
// consumers) against 192 × 192 (three) and 128 × 192, on shapes all of them divide (1152 rows per expert, N = 1536).
int main(int argc, char** argv) {
  setvbuf(stdout, nullptr, _IOLBF, 0);
  const bool tiles_only = argc > 1 && std::string(argv[1]) == "tiles";
  const bool intake_only = argc > 1 && std::string(argv[1]) == "intake";
  int sms = 0;
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), "SM count");
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, 0), "properties");
  // Qwen3-30B-A3B at T = 16384, k = 8: 131072 routed rows, 1024 per expert (balanced).
  const Shape shapes[] = {
      {"GEMM2", 128, 1024, 2048, 768, false},  // act rows in expert order × down_proj
      {"GEMM1", 128, 1024, 1536, 2048, true},  // gathered token rows × gate_up_proj (as a plain 1536-wide GEMM)
  };
  // For `tiles`: K = 768 with slot-row stores (GEMM2's ratio of output bytes to MMA work) and GEMM1's gathered
  // K = 2048, both at N = 1536 and 1152 rows per expert, which 128-, 192- and 256-wide tiles all divide.
  const Shape tile_shapes[] = {
      {"K768", 128, 1152, 1536, 768, false},
      {"K2048", 128, 1152, 1536, 2048, true},
  };
  size_t a_elems = 0, w_elems = 0, out_elems = 0;
  int routed = 0;
  for (const Shape& s : tile_shapes) {
    a_elems = std::max(a_elems, static_cast<size_t>(s.experts) * s.rows_per_expert * s.K);
    w_elems = std::max(w_elems, static_cast<size_t>(s.experts) * s.N * s.K);
    out_elems = std::max(out_elems, static_cast<size_t>(s.experts) * s.rows_per_expert * s.N);
    routed = std::max(routed, s.experts * s.rows_per_expert);
  }
  for (const Shape& s : shapes) {
    a_elems = std::max(a_elems, static_cast<size_t>(s.experts) * s.rows_per_expert * s.K);
    w_elems = std::max(w_elems, static_cast<size_t>(s.experts) * s.N * s.K);
    out_elems = std::max(out_elems, static_cast<size_t>(s.experts) * s.rows_per_expert * ((s.N + 255) / 256 + 1) * 256);
  }
  bf16 *A, *W, *out;
  int32_t* gather;
  check(cudaMalloc(&A, a_elems * 2), "A");
  check(cudaMalloc(&W, w_elems * 2), "W");
  check(cudaMalloc(&out, out_elems * 2), "out");
  check(cudaMalloc(&act_buf, static_cast<size_t>(128) * 1024 * 768 * 2), "act");
  fill_random<<<1024, 256>>>(A, a_elems, 1u);
  fill_random<<<1024, 256>>>(W, w_elems, 2u);
  check(cudaDeviceSynchronize(), "fill");
  routed = std::max(routed, 128 * 1024);
  const int tokens = 16384;
  std::vector<int32_t> h_gather(routed);
  std::mt19937 rng(1);
  for (int i = 0; i < routed; ++i) h_gather[i] = static_cast<int32_t>(rng() % tokens);
  check(cudaMalloc(&gather, routed * 4), "gather");
  check(cudaMemcpy(gather, h_gather.data(), routed * 4, cudaMemcpyHostToDevice), "gather");
  std::vector<int32_t> h_perm(routed);
  for (int i = 0; i < routed; ++i) h_perm[i] = i;
  std::shuffle(h_perm.begin(), h_perm.end(), rng);
  int32_t* perm;
  check(cudaMalloc(&perm, routed * 4), "perm");
  check(cudaMemcpy(perm, h_perm.data(), routed * 4, cudaMemcpyHostToDevice), "perm");
  std::printf("%s, %d SMs\n", prop.name, sms);
  const Buffers buf{A, gather, perm, W, out};
  if (intake_only) {
    // What a 128 × 256 tile's stages take in a clock per SM with no MMA to wait for, against the k-step the real
    // mainloop takes (its MMA: 1024 cycles).
    for (const Shape& s : shapes)
      run_each<Run<256, kCooperative, kNoStores, kIntakeBoth>, Run<256, kCooperative, kNoStores, kIntakeWeights>,
               Run<256, kCooperative, kNoStores, kIntakeRows>, Run<256, kCooperative, kNoStores>>(s, buf, sms);
    return 0;
  }
  if (tiles_only) {
    for (const Shape& s : tile_shapes)
      run_each<Run<256, kCooperative, kNoStores>, Run<192, kCooperative3, kNoStores>,
               Run<256, kCooperative, kStagedSlices>, Run<192, kCooperative3, kStagedSlices>,
               Run<192, kCooperative, kStagedSlices>, Run<256, kCooperative, kStagedSlices>,
               Run<192, kCooperative3, kStagedSlices>>(s, buf, sms);
    return 0;
  }
  for (const Shape& s : shapes) {
    // Each store pattern under today's schedule and ping-pong 128 × 192, then the other tile shapes.
    run_each<Run<256, kCooperative, kNoStores>, Run<192, kPingPong, kNoStores>, Run<256, kCooperative, kTileBlocks>,
             Run<192, kPingPong, kTileBlocks>, Run<256, kCooperative, kRowSegments>, Run<192, kPingPong, kRowSegments>,
             Run<256, kCooperative, kStagedSlices>, Run<192, kPingPong, kStagedSlices>,
             Run<192, kCooperative, kStagedSlices>, Run<128, kPingPong, kStagedSlices>>(s, buf, sms);
    // GEMM1's gated epilogue, its parts and two layouts of the block's buffers.
    if (s.gather)
      run_each<Run<256, kCooperative, kGatedSlices>, Run<256, kCooperative, kGateUpOnly>,
               Run<256, kCooperative, kGatedNoSilu>, Run<256, kCooperative, kActOnly>,
               Run<256, kCooperative, kGatedInterleaved>, Run<256, kCooperative, kGatedBlocked>>(s, buf, sms);
  }
  return 0;
}
