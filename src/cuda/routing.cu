// Router kernels: fused float32 softmax + top-k + renormalisation (a warp per token), a stable counting
// sort by expert with no host synchronisation (one block for few slots, else three kernels over the GPU), both in one
// cooperative launch for the block's forward (route_and_sort), and the router backward.
#include <cfloat>
#include <cstdint>
#include <type_traits>

#include <cooperative_groups.h>

#include "common.cuh"

namespace fusedmoe::detail::cuda {

namespace {

constexpr int kRouteWarps = 4;   // tokens per block
constexpr int kMaxExperts = 4096;
constexpr int kRegisterTopkExperts = 256;  // route_topk keeps a token's keys in registers up to here (8 per lane)
// kSortChunk (backend.hpp): slots per sort block (one warp, kSortRounds rounds of 32).

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(0xffffffffu, v, d);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, d));
  return v;
}

// p[0..E) = softmax(float32(logits row)); a NaN anywhere makes the whole row NaN (as torch.softmax).
template <class L>
__device__ void softmax_row(const L* row, float* p, int E, int lane) {
  float mx = -INFINITY;
  bool nan = false;
  for (int e = lane; e < E; e += 32) {
    const float v = to_f32(row[e]);
    p[e] = v;
    nan |= isnan(v);
    mx = fmaxf(mx, v);
  }
  mx = warp_max(mx);
  nan = __any_sync(0xffffffffu, nan);
  float s = 0.f;
  for (int e = lane; e < E; e += 32) s += (p[e] = nan ? NAN : expf(p[e] - mx));
  s = warp_sum(s);
  for (int e = lane; e < E; e += 32) p[e] /= s;
  __syncwarp();
}

// softmax_row for E <= 32·V with the row in registers: p[i] is expert lane + 32·i (unset past E). Every load is issued
// before the first use, where softmax_row's loads wait for one another (its shared stores may alias the generic row
// pointer, so the compiler keeps them in order): a token then costs one memory latency, not E/32 of them. The
// same operations in the same order as softmax_row, so the same bits.
template <int V, class L>
__device__ __forceinline__ void softmax_registers(const L* row, float (&p)[V], int E, int lane) {
#pragma unroll
  for (int i = 0; i < V; ++i) p[i] = lane + 32 * i < E ? to_f32(row[lane + 32 * i]) : 0.f;
  float mx = -INFINITY;
  bool nan = false;
#pragma unroll
  for (int i = 0; i < V; ++i)
    if (lane + 32 * i < E) nan |= isnan(p[i]), mx = fmaxf(mx, p[i]);
  mx = warp_max(mx);
  nan = __any_sync(0xffffffffu, nan);
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < V; ++i)
    if (lane + 32 * i < E) s += (p[i] = nan ? NAN : expf(p[i] - mx));
  s = warp_sum(s);
#pragma unroll
  for (int i = 0; i < V; ++i) p[i] /= s;
}

// Top-k order: larger first, NaN above every number, ties to the lower expert id.
__device__ __forceinline__ bool ranks_before(float a, int ia, float b, int ib) {
  const bool na = isnan(a), nb = isnan(b);
  if (na != nb) return na;
  if (!na && a != b) return a > b;
  return ia < ib;
}

// A selection's rank as one unsigned 64-bit key, larger first, in the order of ranks_before: the probability's bits
// above (softmax outputs lie in [0, 1], whose float bits order as unsigned integers; NaN above every number),
// the inverted expert id below (ties to the lower id). Every valid key is nonzero; 0 marks no entry.
__device__ __forceinline__ uint64_t selection_key(float p, int e) {
  const uint32_t bits = isnan(p) ? 0xFFFFFFFFu : __float_as_uint(p);
  return (static_cast<uint64_t>(bits) << 32) | static_cast<uint32_t>(~e);
}

// One token's softmax, top-k and renormalisation by one warp, E <= 32·V and k <= 32: the row stays in registers
// (softmax_registers) and each lane keeps the keys of its experts lane, lane + 32, … sorted there, so a selection
// round is one warp argmax over the lanes' best keys (two warp reductions), and the winning lane moves on to its
// next. Writes the token's k ids and weights (lane j selection j) and returns lane j's expert (-1 past k).
template <int V, class L, class W>
__device__ __forceinline__ int route_token(const L* row, W* weights, int32_t* ids, int E, int k, bool norm, int lane) {
  float pr[V];
  softmax_registers(row, pr, E, lane);
  uint64_t keys[V];
#pragma unroll
  for (int i = 0; i < V; ++i) keys[i] = lane + 32 * i < E ? selection_key(pr[i], lane + 32 * i) : 0;
#pragma unroll
  for (int i = 0; i < V; ++i)  // sorted, largest first (a compile-time network: the keys stay in registers)
#pragma unroll
    for (int j = 0; j + 1 < V - i; ++j)
      if (keys[j] < keys[j + 1]) {
        const uint64_t x = keys[j];
        keys[j] = keys[j + 1], keys[j + 1] = x;
      }
  int held_id = -1;  // selection `lane`
  float held_p = 0.f;
  float sum = 0.f;   // of the selected probabilities, in selection order (every lane holds the same)
  for (int j = 0; j < k; ++j) {
    // The warp's best key in two reductions: the largest probability bits, then the lowest expert id among the
    // lanes holding them (one instruction each on sm_80+, against five dependent 64-bit shuffle steps).
    const uint32_t bits = static_cast<uint32_t>(keys[0] >> 32), id = ~static_cast<uint32_t>(keys[0]);
    const uint32_t top = __reduce_max_sync(0xffffffffu, bits);
    const uint32_t best_id = __reduce_min_sync(0xffffffffu, bits == top ? id : 0xFFFFFFFFu);
    const bool won = bits == top && id == best_id;  // the ids are distinct: one lane
#pragma unroll
    for (int i = 0; i + 1 < V; ++i) keys[i] = won ? keys[i + 1] : keys[i];
    keys[V - 1] = won ? 0 : keys[V - 1];
    const float bv = top == 0xFFFFFFFFu ? NAN : __uint_as_float(top);  // the probability the key holds
    if (lane == j) held_id = static_cast<int>(best_id), held_p = bv;
    sum += bv;
  }
  if (lane < k) ids[lane] = held_id, weights[lane] = from_f32<W>(norm ? held_p / sum : held_p);
  return held_id;
}

template <int V, class L, class W>
__global__ void route_topk_kernel(const L* logits, W* weights, int32_t* ids, int64_t T, int E, int k, bool norm) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRouteWarps + threadIdx.x / 32;
  if (t < T) route_token<V>(logits + t * E, weights + t * k, ids + t * k, E, k, norm, threadIdx.x % 32);
}

// route_topk for any E and k, one token per warp: each selection round scans the row's probabilities in shared
// memory, where the taken flags follow them.
template <class L, class W>
__global__ void route_topk_scan_kernel(const L* logits, W* weights, int32_t* ids, int64_t T, int E, int k,
                                       bool norm) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRouteWarps + warp;
  if (t >= T) return;
  float* p = smem + warp * E;
  unsigned char* taken = reinterpret_cast<unsigned char*>(smem + kRouteWarps * E) + warp * E;
  softmax_row(logits + t * E, p, E, lane);
  for (int e = lane; e < E; e += 32) taken[e] = 0;
  __syncwarp();
  // Selection j is held by lane j % 32 until its round of 32 is complete, so the ids and weights go out in parallel.
  int held_id = 0;
  float held_p = 0.f;
  float sum = 0.f;  // of the selected probabilities, in selection order (every lane holds the same)
  for (int j = 0; j < k; ++j) {
    float bv = 0.f;
    int bi = INT32_MAX;
    for (int e = lane; e < E; e += 32)
      if (!taken[e] && (bi == INT32_MAX || ranks_before(p[e], e, bv, bi))) bv = p[e], bi = e;
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, d);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, d);
      if (oi != INT32_MAX && (bi == INT32_MAX || ranks_before(ov, oi, bv, bi))) bv = ov, bi = oi;
    }
    if (lane == 0) taken[bi] = 1;
    if (lane == j % 32) held_id = bi, held_p = bv;
    sum += bv;
    if ((j % 32 == 31 || j == k - 1) && lane <= j % 32) ids[t * k + j - j % 32 + lane] = held_id;
    __syncwarp();
  }
  // The weights need the final sum: the last round's from registers, earlier rounds' (k > 32) through their ids.
  for (int j0 = 0; j0 < k; j0 += 32) {
    const int j = j0 + lane;
    if (j < k) {
      const float v = j0 + 32 >= k ? held_p : p[ids[t * k + j]];
      weights[t * k + j] = from_f32<W>(norm ? v / sum : v);
    }
  }
}

// The counting sort's pieces, shared by its three-kernel and one-block forms. A warp handles 32 slots at a time (a
// round); id is the slot's expert (out-of-range ids clamped), or -1 for a lane without a slot.
__device__ __forceinline__ int slot_expert(const int32_t* ids, int64_t f, int64_t end, int E) {
  return f < end ? min(max(__ldcg(ids + f), 0), E - 1) : -1;  // L2: in route_and_sort other blocks wrote the ids
}

// counts[e] += the round's slots of expert e (one lane per expert adds; a warp's counts are its own).
__device__ __forceinline__ void count_round(int id, int lane, int32_t* counts) {
  const unsigned mask = __match_any_sync(0xffffffffu, id);
  if (id >= 0 && lane == __ffs(mask) - 1) counts[id] += __popc(mask);
  __syncwarp();
}

// Writes the round's slots in lane order: row next_row[e] + the earlier lanes of expert e (stable), then moves
// next_row[e] past them.
__device__ __forceinline__ void scatter_round(int id, int lane, int32_t slot, int32_t* next_row, int32_t* gather) {
  const unsigned mask = __match_any_sync(0xffffffffu, id);
  const int rank = __popc(mask & ((1u << lane) - 1u));
  if (id >= 0) gather[next_row[id] + rank] = slot;
  __syncwarp();
  if (id >= 0 && lane == __ffs(mask) - 1) next_row[id] += __popc(mask);
  __syncwarp();
}

// One warp's exclusive scan of the experts' sizes, 32 experts a round: first(e, first row of e) for each expert;
// returns the total (every lane).
template <class Size, class First>
__device__ __forceinline__ int32_t scan_expert_sizes(int E, int lane, Size size_of, First first) {
  int32_t carry = 0;  // rows of the experts before this round's 32
  for (int e0 = 0; e0 < E; e0 += 32) {
    const int e = e0 + lane;
    const int32_t size = e < E ? size_of(e) : 0;
    const int32_t incl = warp_inclusive_sum(size, lane);
    if (e < E) first(e, carry + incl - size);
    carry += __shfl_sync(0xffffffffu, incl, 31);
  }
  return carry;
}

// A sort block's chunk of slot experts, loaded before anything else: the rounds' shared-memory writes would
// otherwise keep each round's load waiting for the previous round (one memory latency per round).
constexpr int kSortRounds = static_cast<int>(kSortChunk / 32);
__device__ __forceinline__ void load_chunk(const int32_t* ids, int64_t M, int E, int64_t chunk, int lane,
                                           int (&id)[kSortRounds]) {
#pragma unroll
  for (int r = 0; r < kSortRounds; ++r) id[r] = slot_expert(ids, chunk * kSortChunk + 32 * r + lane, M, E);
}

// Per-block expert counts of a chunk of slots: counts[e * blocks + b].
__global__ void sort_count_kernel(const int32_t* ids, int64_t M, int E, int32_t* counts, int64_t blocks) {
  extern __shared__ int32_t local[];
  const int lane = threadIdx.x;
  int id[kSortRounds];
  load_chunk(ids, M, E, blockIdx.x, lane, id);
  for (int e = lane; e < E; e += 32) local[e] = 0;
  __syncwarp();
#pragma unroll
  for (int r = 0; r < kSortRounds; ++r) count_round(id[r], lane, local);
  for (int e = lane; e < E; e += 32) counts[static_cast<int64_t>(e) * blocks + blockIdx.x] = local[e];
}

// Exclusive scan of one expert's per-chunk counts in place by the whole block; returns the expert's total (every
// thread). L2 loads: in the one-launch route_and_sort, other blocks wrote the counts.
__device__ int32_t scan_chunk_counts(int32_t* row, int64_t chunks) {
  __shared__ int32_t warp_totals[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  int32_t carry = 0;
  for (int64_t b0 = 0; b0 < chunks; b0 += blockDim.x) {
    const int64_t b = b0 + threadIdx.x;
    const int32_t v = b < chunks ? __ldcg(row + b) : 0;
    const int32_t incl = warp_inclusive_sum(v, lane);
    if (lane == 31) warp_totals[warp] = incl;
    __syncthreads();
    int32_t before = 0, total = 0;
    for (int w = 0; w < warps; ++w) {
      if (w < warp) before += warp_totals[w];
      total += warp_totals[w];
    }
    if (b < chunks) row[b] = carry + before + incl - v;
    carry += total;
    __syncthreads();
  }
  return carry;
}

// For each expert (one block each): its per-chunk counts scanned in place; total to m_sizes.
__global__ void sort_scan_blocks_kernel(int32_t* counts, int64_t blocks, int32_t* m_sizes) {
  const int32_t total = scan_chunk_counts(counts + static_cast<int64_t>(blockIdx.x) * blocks, blocks);
  if (threadIdx.x == 0) m_sizes[blockIdx.x] = total;
}

// Warp-level scatter of chunk `chunk`'s slots (ids: load_chunk) to their expert-order rows, next_row[e] (the warp's
// E ints of shared memory) holding the first row of expert e for this chunk (the expert's first row + its rows in
// earlier chunks).
__device__ __forceinline__ void scatter_chunk(const int (&id)[kSortRounds], int64_t chunk, int lane, int32_t* next_row,
                                              int32_t* gather) {
  __syncwarp();
#pragma unroll
  for (int r = 0; r < kSortRounds; ++r)
    scatter_round(id[r], lane, static_cast<int32_t>(chunk * kSortChunk + 32 * r + lane), next_row, gather);
}

// Writes each slot to its expert-order row. Every block derives the expert offsets from m_sizes itself (a warp scan
// over E, E <= kMaxExperts), and block 0 also stores them, which saves a launch between the scan and the scatter.
__global__ void sort_scatter_kernel(const int32_t* ids, int64_t M, int E, const int32_t* counts, int64_t blocks,
                                    const int32_t* m_sizes, int32_t* offsets, int32_t* gather) {
  extern __shared__ int32_t next_row[];
  const int lane = threadIdx.x;
  int id[kSortRounds];
  load_chunk(ids, M, E, blockIdx.x, lane, id);
  const int32_t total = scan_expert_sizes(E, lane, [&](int e) { return m_sizes[e]; }, [&](int e, int32_t first) {
    next_row[e] = first + counts[static_cast<int64_t>(e) * blocks + blockIdx.x];
    if (blockIdx.x == 0) offsets[e] = first;
  });
  if (blockIdx.x == 0 && lane == 0) offsets[E] = total;
  scatter_chunk(id, blockIdx.x, lane, next_row, gather);
}

// route_topk and the counting sort of its ids in one cooperative launch (E <= 256, k <= 32 dividing kSortChunk), in
// three phases separated by grid-wide barriers, where the separate kernels take four launches (launch-bound at
// small T, where each kernel runs a few µs):
//   (1) block b routes the tokens of chunks b, b + grid, …: a chunk's kSortChunk slots are kSortChunk / k whole
//       tokens, one per warp at a time, and the block counts the chunk's experts in shared memory;
//   (2) the per-chunk counts of each expert are scanned (sort_scan_blocks_kernel's work) by a warp or a block;
//   (3) warp w of block b scatters chunk b + w·grid, … (sort_scatter_kernel's).
// The same ids, weights and rows as route_topk + sort_by_expert. Data other blocks wrote is read through L2 (__ldcg),
// never from a line this SM's L1 may hold from before the barrier.
// Two blocks per SM (64 warps: phase 1 is latency-bound), hence 32 registers a thread and a few bytes spilled.
constexpr int kRouteSortThreads = 1024;
constexpr int kWarpScanRounds = 8;  // phase (2): a warp scans up to 32 · 8 chunks in registers
template <int V, class L, class W>
__global__ void __launch_bounds__(kRouteSortThreads, 2)
    route_sort_kernel(const L* logits, W* weights, int32_t* ids, int64_t T, int E, int k, bool norm, int32_t* counts,
                      int64_t chunks, int32_t* m_sizes, int32_t* offsets, int32_t* gather) {
  __shared__ int32_t chunk_counts[kRegisterTopkExperts];
  __shared__ int32_t first_row[kRegisterTopkExperts];
  __shared__ int32_t next_row[kRouteSortThreads / 32][kRegisterTopkExperts];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const int64_t chunk_tokens = kSortChunk / k, M = T * k;
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    for (int e = threadIdx.x; e < E; e += blockDim.x) chunk_counts[e] = 0;
    __syncthreads();
    for (int64_t i = warp; i < chunk_tokens && c * chunk_tokens + i < T; i += warps) {
      const int64_t t = c * chunk_tokens + i;
      const int e = route_token<V>(logits + t * E, weights + t * k, ids + t * k, E, k, norm, lane);
      if (lane < k) atomicAdd(&chunk_counts[e], 1);  // integer sums: the order does not matter
    }
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x) counts[static_cast<int64_t>(e) * chunks + c] = chunk_counts[e];
    __syncthreads();
  }
  cooperative_groups::this_grid().sync();
  // (2) Expert e's counts over the chunks scanned by one warp, all of them loaded first (one memory latency), where
  // they fit its registers; else by a whole block per expert.
  if (chunks <= 32 * kWarpScanRounds) {
    for (int64_t e = static_cast<int64_t>(blockIdx.x) * warps + warp; e < E;
         e += static_cast<int64_t>(gridDim.x) * warps) {
      int32_t* row = counts + e * chunks;
      int32_t v[kWarpScanRounds];
#pragma unroll
      for (int r = 0; r < kWarpScanRounds; ++r) v[r] = 32 * r + lane < chunks ? __ldcg(row + 32 * r + lane) : 0;
      int32_t carry = 0;
#pragma unroll
      for (int r = 0; r < kWarpScanRounds; ++r)
        if (32 * r < chunks) {
          const int32_t incl = warp_inclusive_sum(v[r], lane);
          if (32 * r + lane < chunks) row[32 * r + lane] = carry + incl - v[r];
          carry += __shfl_sync(0xffffffffu, incl, 31);
        }
      if (lane == 0) m_sizes[e] = carry;
    }
  } else {
    for (int e = blockIdx.x; e < E; e += gridDim.x) {
      const int32_t total = scan_chunk_counts(counts + static_cast<int64_t>(e) * chunks, chunks);
      if (threadIdx.x == 0) m_sizes[e] = total;
    }
  }
  cooperative_groups::this_grid().sync();
  // (3) Warp w scatters chunks b + w·grid, …; the first one's ids and expert counts are loaded beside warp 0's scan of
  // the experts' sizes into their first rows.
  constexpr int kLaneExperts = kRegisterTopkExperts / 32;
  const int64_t first_chunk = blockIdx.x + static_cast<int64_t>(warp) * gridDim.x;
  const int64_t chunk_stride = static_cast<int64_t>(gridDim.x) * warps;
  int id[kSortRounds];
  int32_t* earlier = next_row[warp];  // expert e's rows in earlier chunks, then its first row for this chunk
  auto load = [&](int64_t c) {
    load_chunk(ids, M, E, c, lane, id);
#pragma unroll
    for (int i = 0; i < kLaneExperts; ++i)
      if (lane + 32 * i < E) earlier[lane + 32 * i] = __ldcg(counts + static_cast<int64_t>(lane + 32 * i) * chunks + c);
  };
  if (first_chunk < chunks) load(first_chunk);
  if (warp == 0) {
    int32_t size[kLaneExperts];
#pragma unroll
    for (int i = 0; i < kLaneExperts; ++i) size[i] = lane + 32 * i < E ? __ldcg(m_sizes + lane + 32 * i) : 0;
    int32_t carry = 0;
#pragma unroll
    for (int i = 0; i < kLaneExperts; ++i) {
      const int32_t incl = warp_inclusive_sum(size[i], lane);
      if (lane + 32 * i < E) {
        first_row[lane + 32 * i] = carry + incl - size[i];
        if (blockIdx.x == 0) offsets[lane + 32 * i] = carry + incl - size[i];
      }
      carry += __shfl_sync(0xffffffffu, incl, 31);
    }
    if (blockIdx.x == 0 && lane == 0) offsets[E] = carry;
  }
  __syncthreads();
  for (int64_t c = first_chunk; c < chunks; c += chunk_stride) {
    if (c != first_chunk) load(c);
#pragma unroll
    for (int i = 0; i < kLaneExperts; ++i)
      if (lane + 32 * i < E) earlier[lane + 32 * i] += first_row[lane + 32 * i];
    scatter_chunk(id, c, lane, next_row[warp], gather);
    __syncwarp();
  }
}

// The whole stable counting sort in one block of 32 warps, for few slots (one launch where the three-kernel sort
// takes three, each mostly launch latency at small T). Warp w owns the slots [w·chunk, (w+1)·chunk), held in
// registers (at most kSmallSortRounds per lane) so that their loads are in flight together:
//   (1) each warp counts its slots per expert;
//   (2) per expert, those counts become the rows of the expert in earlier warps (exclusive over warps) and the
//       total (m_sizes);
//   (3) warp 0 scans the totals into the expert offsets;
//   (4) each warp writes its slots in order: row = offsets[e] + rows of e in earlier warps + earlier in this warp
//       (the first two summed into the warp's next row of e).
// The rows come out as the multi-block sort's: the stable order is unique.
constexpr int kSmallSortWarps = 32;
constexpr int kSmallSortRounds = 4;  // 32-slot rounds per warp: up to 32 · 32 · 4 = 4096 slots
constexpr int kSmallSortMaxExperts = 256;
constexpr int64_t kSmallSortMaxSlots = int64_t{32} * kSmallSortWarps * kSmallSortRounds;

__global__ void __launch_bounds__(kSmallSortWarps * 32)
sort_small_kernel(const int32_t* ids, int64_t M, int E, int32_t* m_sizes, int32_t* offsets, int32_t* gather) {
  __shared__ int32_t before[kSmallSortWarps][kSmallSortMaxExperts];  // per warp and expert: counts, then prefixes
  __shared__ int32_t first_row[kSmallSortMaxExperts];                // per expert: totals, then offsets
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int i = threadIdx.x; i < kSmallSortWarps * E; i += blockDim.x) before[i / E][i % E] = 0;
  // Chunks of whole 32-slot rounds, so that a round never straddles two warps.
  const int64_t chunk = ((M + kSmallSortWarps - 1) / kSmallSortWarps + 31) / 32 * 32;
  const int64_t begin = warp * chunk, end = min(begin + chunk, M);
  int id[kSmallSortRounds];
#pragma unroll
  for (int r = 0; r < kSmallSortRounds; ++r) id[r] = slot_expert(ids, begin + 32 * r + lane, end, E);
  __syncthreads();
  int32_t* mine = before[warp];
#pragma unroll
  for (int r = 0; r < kSmallSortRounds; ++r) count_round(id[r], lane, mine);
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int32_t rows = 0;
    for (int w = 0; w < kSmallSortWarps; ++w) {
      const int32_t c = before[w][e];
      before[w][e] = rows;
      rows += c;
    }
    first_row[e] = rows;
    m_sizes[e] = rows;
  }
  __syncthreads();
  if (warp == 0) {
    const int32_t total = scan_expert_sizes(E, lane, [&](int e) { return first_row[e]; },
                                            [&](int e, int32_t first) { first_row[e] = offsets[e] = first; });
    if (lane == 0) offsets[E] = total;
  }
  __syncthreads();
  for (int e = lane; e < E; e += 32) mine[e] += first_row[e];  // this warp's next row of each expert
  __syncwarp();
#pragma unroll
  for (int r = 0; r < kSmallSortRounds; ++r)
    scatter_round(id[r], lane, static_cast<int32_t>(begin + 32 * r + lane), mine, gather);
}

// V > 0 (E <= 32·V, k <= 32): the softmax in registers (softmax_registers) and lane j's selection (id, weight
// gradient) loaded with the row, so a token costs one memory latency; V = 0: any E and k.
template <int V, class L, class DW, class DL>
__global__ void route_topk_backward_kernel(const L* logits, const int32_t* ids, const DW* d_weights, DL* d_logits,
                                           int64_t T, int E, int k, bool norm) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRouteWarps + warp;
  if (t >= T) return;
  float* p = smem + warp * E;
  int lane_id = 0;       // V > 0: selection `lane`'s expert and weight gradient
  float lane_dw = 0.f;
  if constexpr (V > 0) {
    if (lane < k) lane_id = min(max(ids[t * k + lane], 0), E - 1), lane_dw = to_f32(d_weights[t * k + lane]);
    float pr[V];
    softmax_registers(logits + t * E, pr, E, lane);
#pragma unroll
    for (int i = 0; i < V; ++i)
      if (lane + 32 * i < E) p[lane + 32 * i] = pr[i];
    __syncwarp();
  } else {
    softmax_row(logits + t * E, p, E, lane);
  }
  // Below, j runs over lane, lane + 32, … < k: with V > 0 (k <= 32) only j = lane, whose values the lane holds.
  auto id_of = [&](int j) { return V > 0 ? lane_id : min(max(ids[t * k + j], 0), E - 1); };
  auto dw_of = [&](int j) { return V > 0 ? lane_dw : to_f32(d_weights[t * k + j]); };
  float s = 0.f, dot = 0.f;
  for (int j = lane; j < k; j += 32) s += p[id_of(j)];
  s = warp_sum(s);
  for (int j = lane; j < k; j += 32) dot += dw_of(j) * p[id_of(j)] / s;
  dot = warp_sum(dot);
  // With renormalisation w_j = p_j / s: dp_j = (dw_j − Σ_l dw_l w_l) / s. Softmax: dl_e = p_e (dp_e − Σ p dp).
  auto dp_of = [&](int j) { const float dw = dw_of(j); return norm ? (dw - dot) / s : dw; };
  float pdp = 0.f;
  for (int j = lane; j < k; j += 32) pdp += p[id_of(j)] * dp_of(j);
  pdp = warp_sum(pdp);
  for (int e = lane; e < E; e += 32) d_logits[t * E + e] = from_f32<DL>(-p[e] * pdp);
  __syncwarp();
  for (int j = lane; j < k; j += 32) d_logits[t * E + id_of(j)] = from_f32<DL>(p[id_of(j)] * (dp_of(j) - pdp));
}

void check_experts(const char* op, int64_t E) {
  if (E > kMaxExperts)
    throw Error(std::string(op) + ": the CUDA backend supports up to " + std::to_string(kMaxExperts) +
                " experts, got " + std::to_string(E));
}

// fn(std::integral_constant<int, V>) with the register kernels' keys per lane for E <= kRegisterTopkExperts.
template <class Fn>
void with_keys_per_lane(int E, Fn&& fn) {
  static_assert(kRegisterTopkExperts == 8 * 32, "the register kernels go up to 8 keys per lane");
  if (E <= 32) fn(std::integral_constant<int, 1>{});
  else if (E <= 64) fn(std::integral_constant<int, 2>{});
  else if (E <= 128) fn(std::integral_constant<int, 4>{});
  else fn(std::integral_constant<int, 8>{});
}

bool register_topk(int E, int k) { return E <= kRegisterTopkExperts && k <= 32; }

}  // namespace

void route_topk(const Tensor& logits, int top_k, bool norm, const Tensor& weights, const Tensor& ids, Stream s) {
  const int64_t T = logits.shape[0];
  const int E = static_cast<int>(logits.shape[1]);
  check_experts("route_topk", E);
  if (T == 0) return;
  visit_floats([&](auto l_tag, auto w_tag) {
    using L = decltype(l_tag);
    using W = decltype(w_tag);
    const dim3 grid = blocks_for(T, kRouteWarps), block = kRouteWarps * 32;
    if (register_topk(E, top_k)) {
      with_keys_per_lane(E, [&](auto v) {
        route_topk_kernel<v(), L, W><<<grid, block, 0, stream_of(s)>>>(logits.ptr<const L>(), weights.ptr<W>(),
                                                                       ids.ptr<int32_t>(), T, E, top_k, norm);
      });
    } else {
      allow_dynamic_smem<route_topk_scan_kernel<L, W>>(kRouteWarps * kMaxExperts * (sizeof(float) + 1));
      const size_t smem = kRouteWarps * E * (sizeof(float) + 1);  // probabilities and taken flags
      route_topk_scan_kernel<L, W><<<grid, block, smem, stream_of(s)>>>(logits.ptr<const L>(), weights.ptr<W>(),
                                                                        ids.ptr<int32_t>(), T, E, top_k, norm);
    }
    check_launch("route_topk_kernel");
  }, logits.dtype, weights.dtype);
}

void route_and_sort(const Tensor& logits, int top_k, bool norm, const Tensor& weights, const Tensor& ids, int E,
                    const Tensor& gather, const Tensor& m_sizes, const Tensor& offsets, const Tensor& scratch,
                    Stream s) {
  const int64_t T = logits.shape[0], M = T * top_k;
  check_experts("route_and_sort", E);
  // FUSEDMOE_SEPARATE_ROUTING=1: the separate kernels (A/B measurements).
  static const bool separate = env_equals("FUSEDMOE_SEPARATE_ROUTING", "1");
  // Up to kSmallSortMaxSlots slots, route_topk and the one-block sort take two launches and less GPU time than the
  // one launch's barriers (H200, T=64: 14.6 µs against 4 + 4.7).
  auto separate_kernels = [&] {
    cuda::route_topk(logits, top_k, norm, weights, ids, s);
    cuda::sort_by_expert(ids, E, gather, m_sizes, offsets, scratch, s);
  };
  const DeviceInfo device = current_device_info();
  if (separate || M <= kSmallSortMaxSlots || !register_topk(E, top_k) || kSortChunk % top_k != 0 ||
      !scratch.defined() || !device.cooperative)
    return separate_kernels();
  const int64_t chunks = sort_chunks(M);
  bool launched = false;
  visit_floats([&](auto l_tag, auto w_tag) {
    using L = decltype(l_tag);
    using W = decltype(w_tag);
    with_keys_per_lane(E, [&](auto v) {
      auto kernel = route_sort_kernel<v(), L, W>;
      cudaLaunchConfig_t config = {};
      // Every block must be resident at once (the grid barriers).
      config.gridDim = dim3(resident_grid<route_sort_kernel<v(), L, W>, kRouteSortThreads>(chunks, device.sms));
      config.blockDim = dim3(kRouteSortThreads);
      config.stream = stream_of(s);
      cudaLaunchAttribute cooperative;
      cooperative.id = cudaLaunchAttributeCooperative;
      cooperative.val.cooperative = 1;
      config.attrs = &cooperative;
      config.numAttrs = 1;
      const cudaError_t err = cudaLaunchKernelEx(&config, kernel, logits.ptr<const L>(), weights.ptr<W>(),
                                                 ids.ptr<int32_t>(), T, E, top_k, norm, scratch.ptr<int32_t>(), chunks,
                                                 m_sizes.ptr<int32_t>(), offsets.ptr<int32_t>(), gather.ptr<int32_t>());
      // A grid the device cannot hold (fewer SMs than it reports, as in an MPS share) is refused: the separate
      // kernels run instead.
      if (err == cudaErrorCooperativeLaunchTooLarge) {
        (void)cudaGetLastError();
        return;
      }
      check_cuda(err, "route_sort_kernel");
      launched = true;
    });
  }, logits.dtype, weights.dtype);
  if (!launched) separate_kernels();
}

void sort_by_expert(const Tensor& ids, int E, const Tensor& gather, const Tensor& m_sizes, const Tensor& offsets,
                    const Tensor& scratch, Stream s) {
  check_experts("sort_by_expert", E);
  const cudaStream_t stream = stream_of(s);
  const int64_t M = ids.numel();
  const int64_t blocks = sort_chunks(M);
  if (M == 0) {
    check_cuda(cudaMemsetAsync(m_sizes.data, 0, sizeof(int32_t) * E, stream), "cudaMemsetAsync");
    check_cuda(cudaMemsetAsync(offsets.data, 0, sizeof(int32_t) * (E + 1), stream), "cudaMemsetAsync");
    return;
  }
  if (M <= kSmallSortMaxSlots && E <= kSmallSortMaxExperts) {
    sort_small_kernel<<<1, kSmallSortWarps * 32, 0, stream>>>(ids.ptr<const int32_t>(), M, E, m_sizes.ptr<int32_t>(),
                                                              offsets.ptr<int32_t>(), gather.ptr<int32_t>());
    check_launch("sort_small_kernel");
    return;
  }
  // The caller's scratch where it gives one (the block's forward workspace), else the pool's: the allocation
  // and its free are host calls in front of GEMM1, which waits for them at small T.
  Scratch own(scratch.defined() ? 0 : static_cast<size_t>(sort_scratch_elements(M, E)) * sizeof(int32_t), stream);
  int32_t* counts = scratch.defined() ? scratch.ptr<int32_t>() : own.as<int32_t>();
  const size_t smem = sizeof(int32_t) * E;
  sort_count_kernel<<<static_cast<unsigned>(blocks), 32, smem, stream>>>(ids.ptr<const int32_t>(), M, E, counts,
                                                                           blocks);
  check_launch("sort_count_kernel");
  sort_scan_blocks_kernel<<<E, 1024, 0, stream>>>(counts, blocks, m_sizes.ptr<int32_t>());
  check_launch("sort_scan_blocks_kernel");
  sort_scatter_kernel<<<static_cast<unsigned>(blocks), 32, smem, stream>>>(
      ids.ptr<const int32_t>(), M, E, counts, blocks, m_sizes.ptr<const int32_t>(), offsets.ptr<int32_t>(),
      gather.ptr<int32_t>());
  check_launch("sort_scatter_kernel");
}

void route_topk_backward(const Tensor& logits, const Tensor& ids, const Tensor& d_weights, bool norm,
                         const Tensor& d_logits, Stream s) {
  const int64_t T = logits.shape[0];
  const int E = static_cast<int>(logits.shape[1]), k = static_cast<int>(ids.shape[1]);
  check_experts("route_topk_backward", E);
  if (T == 0) return;
  const size_t smem = kRouteWarps * E * sizeof(float);
  visit_floats([&](auto l_tag, auto w_tag, auto o_tag) {
    using L = decltype(l_tag);
    using DW = decltype(w_tag);
    using DL = decltype(o_tag);
    auto launch = [&](auto kernel) {
      kernel<<<blocks_for(T, kRouteWarps), kRouteWarps * 32, smem, stream_of(s)>>>(
          logits.ptr<const L>(), ids.ptr<const int32_t>(), d_weights.ptr<const DW>(), d_logits.ptr<DL>(), T, E, k,
          norm);
    };
    if (register_topk(E, k)) {
      with_keys_per_lane(E, [&](auto v) { launch(route_topk_backward_kernel<v(), L, DW, DL>); });
    } else {
      allow_dynamic_smem<route_topk_backward_kernel<0, L, DW, DL>>(kRouteWarps * kMaxExperts * sizeof(float));
      launch(route_topk_backward_kernel<0, L, DW, DL>);
    }
    check_launch("route_topk_backward_kernel");
  }, logits.dtype, d_weights.dtype, d_logits.dtype);
}

}  // namespace fusedmoe::detail::cuda
