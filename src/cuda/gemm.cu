// Grouped GEMMs on tensor cores (mma.sync m16n8k16, bf16/f16 in, fp32 accumulate) for every matrix
// product of the block: forward (NT), dX (NN) and dW (TN, variable-length reduction over each expert's
// rows), plus the router's products as single-group cases.
//
// One kernel template serves all three: operands are K-major (reduction dim contiguous) or not, and rows
// are addressed through the routing maps, so the token gather happens in the tile loads (cp.async per
// 16-byte chunk) and the slot scatter in the epilogue stores. Deterministic: no atomics, each output
// element is written by exactly one thread after a fixed-order reduction.
#include <cstdint>

#include "../router_split.hpp"
#include "gemm_problem.cuh"
#include "slot_sum.cuh"

namespace fusedmoe::detail::cuda {

namespace {

constexpr int kBM = 128, kBN = 128, kBK = 32, kStages = 4, kThreads = 256;
constexpr int kPad = 8;  // 16 bytes of padding per shared-memory row: ldmatrix rows hit distinct banks

enum class Mode { grouped_m, varlen_k };


template <bool KMajor, int Rows>
struct TileShape {
  // K-major: [Rows][kBK] (k contiguous); otherwise [kBK][Rows] (rows contiguous).
  static constexpr int kRowsStored = KMajor ? Rows : kBK;
  static constexpr int kCols = KMajor ? kBK : Rows;
  static constexpr int kLd = kCols + kPad;
  static constexpr int kElems = kRowsStored * kLd;
  static constexpr int kChunksPerRow = kCols / 8;
  static constexpr int kChunks = kRowsStored * kChunksPerRow;
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem)), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

template <bool Trans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  if constexpr (Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(smem)));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(smem)));
}

template <class T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Copies one tile into shared memory. row_ptr(r) gives the global address of stored row r at the tile's
// first column (nullptr: row out of range, zero-filled); `valid` columns exist from there. Full aligned
// 16-byte chunks go through cp.async; ragged edges and unaligned rows are copied element by element.
template <class T, class Shape, class RowPtr>
__device__ __forceinline__ void load_tile(T* smem, RowPtr&& row_ptr, int64_t valid) {
  static_assert(Shape::kChunks % kThreads == 0, "tile chunks must divide among the threads");
#pragma unroll
  for (int j = 0; j < Shape::kChunks / kThreads; ++j) {
    const int c = threadIdx.x + j * kThreads;
    const int r = c / Shape::kChunksPerRow, col = (c % Shape::kChunksPerRow) * 8;
    T* dst = smem + r * Shape::kLd + col;
    const T* src = row_ptr(r);
    if (src != nullptr && col + 8 <= valid && (reinterpret_cast<uintptr_t>(src + col) & 15) == 0) {
      cp_async_16(dst, src + col);
    } else {
      alignas(16) T vals[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) vals[e] = (src != nullptr && col + e < valid) ? src[col + e] : from_f32<T>(0.f);
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(vals);
    }
  }
}

// Finds this CTA's (group, m-tile) among all groups' m-tiles: a warp scans the per-group tile counts.
__device__ __forceinline__ bool find_group_tile(const DeviceRouting& rt, int64_t tile, int& group, int64_t& m0) {
  __shared__ int s_group;
  __shared__ int64_t s_m0;
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    int64_t base = 0;
    int found_group = -1;
    int64_t found_m0 = 0;
    for (int e0 = 0; e0 < rt.num_experts; e0 += 32) {
      const int e = e0 + lane;
      int64_t tiles = 0;
      if (e < rt.num_experts) {
        const int64_t m = rt.offset(e + 1) - rt.offset(e);
        tiles = m > 0 ? (m + kBM - 1) / kBM : 0;
      }
      const int64_t incl = warp_inclusive_sum(tiles, lane);
      const int64_t lo = base + incl - tiles;
      const bool mine = tiles > 0 && tile >= lo && tile < base + incl;
      const unsigned hit = __ballot_sync(0xffffffffu, mine);
      if (hit) {
        const int src = __ffs(hit) - 1;
        found_group = e0 + src;
        found_m0 = (tile - __shfl_sync(0xffffffffu, lo, src)) * kBM;
        break;
      }
      base += __shfl_sync(0xffffffffu, incl, 31);
    }
    if (lane == 0) {
      s_group = found_group;
      s_m0 = found_m0;
    }
  }
  __syncthreads();
  group = s_group;
  m0 = s_m0;
  return group >= 0;
}

template <class T, class OutT, bool AK, bool BK_, Mode kMode>
__global__ void __launch_bounds__(kThreads) grouped_gemm_kernel(const Problem<T, OutT> p) {
  using ShapeA = TileShape<AK, kBM>;
  using ShapeB = TileShape<BK_, kBN>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem_a = reinterpret_cast<T*>(smem_raw);
  T* smem_b = smem_a + kStages * ShapeA::kElems;
  const DeviceRouting& rt = p.routing;

  // This CTA's output tile and the routed rows it covers.
  int group;
  int64_t m0, n0, row_begin, row_end, M, K;
  if constexpr (kMode == Mode::grouped_m) {
    if (!find_group_tile(rt, blockIdx.x, group, m0)) return;
    n0 = static_cast<int64_t>(blockIdx.y) * kBN;
    row_begin = rt.offset(group);
    row_end = rt.offset(group + 1);
    M = row_end - row_begin;  // rows of this group
    K = p.K;
  } else {
    group = blockIdx.y;
    const int64_t n_tiles = (p.N + kBN - 1) / kBN;
    m0 = (blockIdx.x / n_tiles) * kBM;
    n0 = (blockIdx.x % n_tiles) * kBN;
    row_begin = rt.offset(group);
    row_end = rt.offset(group + 1);
    M = p.M;
    K = row_end > row_begin ? row_end - row_begin : 0;  // the reduction runs over the group's rows
  }
  const int64_t N = p.N;
  const T* B_group = p.B + (kMode == Mode::grouped_m ? group * p.b_group_stride : 0);

  // Global row pointers of the tiles (K-major rows are fixed across k-steps; the others move with k).
  auto a_row = [&](int r, int64_t k0) -> const T* {
    if constexpr (AK) {  // row m = m0 + r of the group, reduction columns from k0
      const int64_t i = row_begin + m0 + r;
      return (m0 + r < M) ? p.A + rt.row(p.a_map, i) * p.lda + k0 : nullptr;
    } else {  // stored row k = k0 + r (a routed row of the group), columns m from m0
      const int64_t i = row_begin + k0 + r;
      return (k0 + r < K) ? p.A + rt.row(p.a_map, i) * p.lda + m0 : nullptr;
    }
  };
  auto b_row = [&](int r, int64_t k0) -> const T* {
    if constexpr (BK_) {  // row n = n0 + r of the group's weight, columns k from k0
      return (n0 + r < N) ? B_group + (n0 + r) * p.ldb + k0 : nullptr;
    } else if constexpr (kMode == Mode::grouped_m) {  // weight row k = k0 + r, columns n from n0
      return (k0 + r < K) ? B_group + (k0 + r) * p.ldb + n0 : nullptr;
    } else {  // routed row k0 + r of the group, columns n from n0
      const int64_t i = row_begin + k0 + r;
      return (k0 + r < K) ? p.B + rt.row(p.b_map, i) * p.ldb + n0 : nullptr;
    }
  };
  auto load_stage = [&](int stage, int64_t k0) {
    load_tile<T, ShapeA>(smem_a + stage * ShapeA::kElems, [&](int r) { return a_row(r, k0); },
                         AK ? K - k0 : M - m0);
    load_tile<T, ShapeB>(smem_b + stage * ShapeB::kElems, [&](int r) { return b_row(r, k0); },
                         BK_ ? K - k0 : N - n0);
  };

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / 4, wn = warp % 4;  // 2 × 4 warps, each a 64 × 32 tile
  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int v = 0; v < 4; ++v) acc[i][j][v] = 0.f;

  const int64_t k_tiles = (K + kBK - 1) / kBK;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load_stage(s, s * kBK);
    cp_async_commit();
  }
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile kt landed for all threads; the stage refilled below is no longer read
    const int64_t next = kt + kStages - 1;
    if (next < k_tiles) load_stage(static_cast<int>(next % kStages), next * kBK);
    cp_async_commit();

    const T* sa = smem_a + (kt % kStages) * ShapeA::kElems;
    const T* sb = smem_b + (kt % kStages) * ShapeB::kElems;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      uint32_t af[4][4], bf[4][2];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        const int mrow = wm * 64 + mi * 16;
        if constexpr (AK) {
          ldmatrix_x4<false>(af[mi], sa + (mrow + lane % 16) * ShapeA::kLd + kk + (lane / 16) * 8);
        } else {
          const int j = lane / 8, r = lane % 8;
          ldmatrix_x4<true>(af[mi], sa + (kk + r + (j / 2) * 8) * ShapeA::kLd + mrow + (j % 2) * 8);
        }
      }
#pragma unroll
      for (int pair = 0; pair < 2; ++pair) {
        const int ncol = wn * 32 + pair * 16;
        const int j = lane / 8, r = lane % 8;
        uint32_t q[4];
        if constexpr (BK_)
          ldmatrix_x4<false>(q, sb + (ncol + r + (j / 2) * 8) * ShapeB::kLd + kk + (j % 2) * 8);
        else
          ldmatrix_x4<true>(q, sb + (kk + r + (j % 2) * 8) * ShapeB::kLd + ncol + (j / 2) * 8);
        bf[2 * pair][0] = q[0], bf[2 * pair][1] = q[1], bf[2 * pair + 1][0] = q[2], bf[2 * pair + 1][1] = q[3];
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma_16816<T>(acc[mi][ni], af[mi], bf[ni]);
    }
  }
  cp_async_wait<0>();

  // Epilogue: each thread owns pairs of adjacent columns in rows lane/4 and lane/4 + 8 of each fragment.
  OutT* C_group = p.C + (kMode == Mode::varlen_k ? group * p.c_group_stride : 0);
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t m = m0 + wm * 64 + mi * 16 + lane / 4 + half * 8;
      if (m >= M) continue;
      int64_t out_row;
      float scale = 1.f;
      if constexpr (kMode == Mode::grouped_m) {
        const int64_t i = row_begin + m;
        out_row = rt.row(p.c_map, i);
        if (p.row_scale) scale = to_f32(p.row_scale[rt.slot(i)]);
      } else {
        out_row = m;
      }
      OutT* crow = C_group + out_row * p.ldc;
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const int64_t n = n0 + wn * 32 + ni * 8 + (lane % 4) * 2;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          if (n + e >= N) continue;
          float v = acc[mi][ni][half * 2 + e] * scale;
          if (p.accumulate) v += to_f32(crow[n + e]);
          crow[n + e] = from_f32<OutT>(v);
        }
      }
    }
}

template <class T, class OutT, bool AK, bool BK_, Mode kMode>
void launch(const Problem<T, OutT>& p, int64_t groups, int64_t M_total, const GemmTiling& tiling, cudaStream_t stream) {
  constexpr int smem = kStages * (TileShape<AK, kBM>::kElems + TileShape<BK_, kBN>::kElems) * sizeof(T);
  constexpr GemmKind kind = kMode == Mode::varlen_k ? GemmKind::tn : (BK_ ? GemmKind::nt : GemmKind::nn);
  // The Hopper kernels, where eligible (and not deselected).
  if (tiling.kernel != GemmKernel::portable && launch_sm90(p, kind, groups, M_total, tiling, stream)) return;
  if (tiling.kernel == GemmKernel::wgmma)
    throw Error("grouped GEMM: the kernel config asks for the wgmma kernel, which needs an sm_90 GPU, rows and sizes "
                "in multiples of 8 elements and 16-byte aligned bases, and at most 1024 experts");
  auto kernel = grouped_gemm_kernel<T, OutT, AK, BK_, kMode>;
  allow_dynamic_smem<grouped_gemm_kernel<T, OutT, AK, BK_, kMode>>(smem);
  dim3 grid;
  if constexpr (kMode == Mode::grouped_m) {
    // Upper bound on the m-tiles of all groups: each group adds at most one partial tile.
    const int64_t tiles = (M_total + kBM - 1) / kBM + std::min<int64_t>(groups, M_total);
    if (tiles == 0 || p.N == 0) return;
    grid = dim3(static_cast<unsigned>(tiles), static_cast<unsigned>((p.N + kBN - 1) / kBN));
  } else {
    const int64_t tiles = ((p.M + kBM - 1) / kBM) * ((p.N + kBN - 1) / kBN);
    if (tiles == 0 || groups == 0) return;
    grid = dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(groups));
  }
  if (grid.y > 65535) throw Error("grouped GEMM: too many column tiles or groups for one launch");
  kernel<<<grid, kThreads, smem, stream>>>(p);
  check_launch("grouped_gemm_kernel");
}

// Dispatches the 16-bit input type and the output type (the input type or float32).
template <class Fn>
void with_types(const char* op, const Tensor& in, const Tensor& out, Fn&& fn) {
  require_tensor_core_dtype(op, "input", in);
  if (out.dtype != in.dtype && out.dtype != DType::f32)
    throw Error(std::string(op) + ": output on CUDA must be " + dtype_name(in.dtype) + " or float32, got " +
                out.describe());
  auto with_out = [&](auto t_tag) {
    using T = decltype(t_tag);
    if (out.dtype == DType::f32) fn(T{}, float{}); else fn(T{}, T{});
  };
  if (in.dtype == DType::bf16) with_out(__nv_bfloat16{}); else with_out(__half{});
}

// The unit counter a caller lends (GemmNT / GemmNN), or null (the sm90 launch then allocates one where it needs it).
unsigned* lent_unit_counter(const Tensor& lent, const char* op) {
  if (!lent.defined()) return nullptr;
  if (lent.dtype != DType::i32 || lent.numel() < 1)
    throw Error(std::string(op) + ": the lent unit counter must hold at least one int32, got " + lent.describe());
  return static_cast<unsigned*>(lent.data);
}

}  // namespace

void gemm_nt(const Routing& r, const GemmNT& g, Stream s) {
  const int64_t N = g.W.shape[1], K = g.W.shape[2];
  if (g.slot_scale.defined() && g.slot_scale.dtype != g.X.dtype)
    throw Error(std::string("grouped_gemm: argument 'row_weights' on CUDA must have the dtype of X (") +
                dtype_name(g.X.dtype) + "), got " + g.slot_scale.describe());
  const Tensor& out = g.Y.defined() ? g.Y : g.act;  // act only: act's dtype
  with_types("grouped_gemm", g.X, out, [&](auto t_tag, auto o_tag) {
    using T = decltype(t_tag);
    using O = decltype(o_tag);
    Problem<T, O> p{g.X.ptr<const T>(), K, g.x_map, g.W.ptr<const T>(), K, N * K, RowMap::identity,
                    g.Y.defined() ? g.Y.ptr<O>() : nullptr, N, 0, g.y_map,
                    g.slot_scale.defined() ? g.slot_scale.ptr<const T>() : nullptr, false, device_routing(r), 0, N, K};
    p.unit_counter = lent_unit_counter(g.unit_counter, "grouped_gemm");
    if (g.act.defined()) {
      if (g.Y.defined() && g.act.dtype != g.Y.dtype)
        throw Error("grouped_gemm: the fused activation output must have Y's dtype, got " + g.act.describe());
      Problem<T, O> gated = p;
      gated.act = g.act.ptr<O>();
      gated.ld_act = N / 2;
      if (g.tiling.kernel != GemmKernel::portable && launch_sm90(gated, GemmKind::nt, r.num_experts, r.M, g.tiling, stream_of(s)))
        return;
    }
    // SiLU·mul not fused on this path: it reads Y, from scratch where the caller keeps none.
    Scratch y_scratch(g.Y.defined() ? 0 : static_cast<size_t>(r.M * N) * sizeof(O), stream_of(s));
    Tensor y = g.Y;
    if (!y.defined()) {
      y = Tensor::contiguous(y_scratch.as<O>(), g.act.dtype, {r.M, N}, g.act.device);
      p.C = y_scratch.as<O>();
    }
    launch<T, O, true, true, Mode::grouped_m>(p, r.num_experts, r.M, g.tiling, stream_of(s));
    if (g.act.defined()) silu_mul(y, g.act, s);
  });
}

void gemm_nn(const Routing& r, const GemmNN& g, Stream s) {
  const int64_t N = g.W.shape[1], K = g.W.shape[2];  // reduction over N, output columns K
  const cudaStream_t stream = stream_of(s);
  const bool sum_slots = g.dx_map == RowMap::token;
  // A token's k slot products land in scratch rows of dX's type, then add up in a fixed order: in the caller's
  // slot_scratch where it lends one, else in the backend's pool.
  const LentOrPooled slots(g.slot_scratch, g.dX.dtype,
                           sum_slots ? static_cast<size_t>(r.M * K) * dtype_size(g.dX.dtype) : 0, stream,
                           "grouped_gemm_dX (slot scratch)");
  with_types("grouped_gemm_dX", g.dY, g.dX, [&](auto t_tag, auto o_tag) {
    using T = decltype(t_tag);
    using O = decltype(o_tag);
    if (sum_slots) {
      Problem<T, O> p{g.dY.ptr<const T>(), N, g.dy_map, g.W.ptr<const T>(), K, N * K, RowMap::identity,
                      slots.as<O>(), K, 0, RowMap::slot, nullptr, false, device_routing(r), 0, K, N};
      p.unit_counter = lent_unit_counter(g.unit_counter, "grouped_gemm_dX");
      launch<T, O, true, false, Mode::grouped_m>(p, r.num_experts, r.M, g.tiling, stream);
      // dX[t] (+)= Σ_j slots[t·k + j], j ascending, in float32 (each slot already rounded to dX's type).
      sum_slot_rows(slots.as<const O>(), static_cast<const O*>(nullptr), g.dX.ptr<O>(), r.T, r.top_k, K, g.accumulate,
                    stream);
    } else {
      Problem<T, O> p{g.dY.ptr<const T>(), N, g.dy_map, g.W.ptr<const T>(), K, N * K, RowMap::identity,
                      g.dX.ptr<O>(), K, 0, g.dx_map, nullptr, g.accumulate, device_routing(r), 0, K, N};
      p.unit_counter = lent_unit_counter(g.unit_counter, "grouped_gemm_dX");
      launch<T, O, true, false, Mode::grouped_m>(p, r.num_experts, r.M, g.tiling, stream);
    }
  });
}

// out[i] = Σ_s partial[s][i], s ascending (deterministic).
template <class OutT>
__global__ void sum_partials_kernel(const float* partial, OutT* out, int64_t n, int splits) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float acc = 0.f;
  for (int s = 0; s < splits; ++s) acc += partial[s * n + i];
  out[i] = from_f32<OutT>(acc);
}
template <class OutT>
void sum_partials(const float* partial, OutT* out, int64_t n, int splits, cudaStream_t stream) {
  if (n == 0) return;
  sum_partials_kernel<OutT><<<blocks_for(n, 256), 256, 0, stream>>>(partial, out, n, splits);
  check_launch("sum_partials_kernel");
}

void gemm_tn(const Routing& r, const GemmTN& g, Stream s) {
  const int64_t N = g.dW.shape[1], K = g.dW.shape[2];
  if (g.X.dtype != g.dY.dtype)
    throw Error(std::string("grouped_gemm_dW: on CUDA 'X' and 'dY' must share a dtype, got ") + g.X.describe() +
                " and " + g.dY.describe());
  const cudaStream_t stream = stream_of(s);
  // A single long reduction (the router's dgate: one group over all tokens) has too few output tiles to
  // fill the GPU: split its rows into fixed chunks, reduce each into a float32 partial, then add the
  // partials in chunk order.
  int splits = 1;
  if (!r.expert_offsets.defined() && r.num_experts == 1) {
    const int64_t tiles = ((N + 127) / 128) * ((K + 127) / 128);
    const int64_t want = (2 * current_device_info().sms + tiles - 1) / tiles;
    splits = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, max_split_k(r.M))));
  }
  // The partial sums: in the caller's split_scratch where it lends one, else in the backend's pool.
  const LentOrPooled partial(g.split_scratch, DType::f32,
                             splits > 1 ? static_cast<size_t>(splits) * N * K * sizeof(float) : 0, stream,
                             "grouped_gemm_dW (split-K scratch)");
  float* partials = partial.as<float>();
  with_types("grouped_gemm_dW", g.X, g.dW, [&](auto t_tag, auto o_tag) {
    using T = decltype(t_tag);
    using O = decltype(o_tag);
    // C[n, k] = Σ_i dY[i, n] · X[i, k]: A stored [i][n], B stored [i][k], both gathered by routed row.
    if (splits == 1) {
      Problem<T, O> p{g.dY.ptr<const T>(), N, g.dy_map, g.X.ptr<const T>(), K, 0, g.x_map,
                      g.dW.ptr<O>(), K, N * K, RowMap::identity, nullptr, false, device_routing(r), N, K, 0};
      launch<T, O, false, false, Mode::varlen_k>(p, r.num_experts, r.M, g.tiling, stream);
      return;
    }
    DeviceRouting chunks = device_routing(r);
    chunks.num_experts = splits;
    chunks.rows_per_group = ((r.M + splits - 1) / splits + 63) / 64 * 64;
    Problem<T, float> p{g.dY.ptr<const T>(), N, g.dy_map, g.X.ptr<const T>(), K, 0, g.x_map,
                        partials, K, N * K, RowMap::identity, nullptr, false, chunks, N, K, 0};
    launch<T, float, false, false, Mode::varlen_k>(p, splits, r.M, g.tiling, stream);
    sum_partials(partials, g.dW.ptr<O>(), N * K, splits, stream);
  });
}

namespace {
Routing single_group(int64_t rows) {
  Routing r;
  r.num_experts = 1;
  r.top_k = 1;
  r.M = rows;
  r.T = rows;
  return r;
}
Tensor as_one_group(const Tensor& w) {  // [E, H] -> [1, E, H]
  Tensor t = Tensor::contiguous(w.data, w.dtype, {1, w.shape[0], w.shape[1]}, w.device);
  return t;
}

template <class In, class Out>
__global__ void convert_kernel(const In* in, Out* out, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = from_f32<Out>(to_f32(in[i]));
}

}  // namespace

// The router's GEMM, split over H where its row tiles leave most SMs idle (router_split_k, src/router_split.hpp):
// group s of a grouped nt GEMM reduces slice s of every row into float32 partials, summed in slice order.
void router_logits(const Tensor& x, const Tensor& gate, const Tensor& logits, const Tensor& split_scratch, Stream s) {
  const int64_t T = x.shape[0], H = x.shape[1], E = gate.shape[0];
  const cudaStream_t stream = stream_of(s);
  const DeviceInfo device = current_device_info();
  const int splits =
      device.sm90 ? router_split_k(T, H, E, device.sms, split_scratch.defined() ? split_scratch.nbytes() : ~size_t{0})
                  : 1;
  if (splits > 1) {
    const int64_t slice = H / splits;
    Tensor lent;  // the lent room as float32
    if (split_scratch.defined())
      lent = Tensor::contiguous(split_scratch.data, DType::f32, {static_cast<int64_t>(split_scratch.nbytes() / 4)},
                                split_scratch.device);
    const LentOrPooled partial(lent, DType::f32, static_cast<size_t>(splits * T * E) * sizeof(float), stream,
                               "router_logits (split-K scratch)");
    bool launched = false;
    with_types("router_logits", x, logits, [&](auto t_tag, auto o_tag) {
      using T16 = decltype(t_tag);
      using O = decltype(o_tag);
      // S groups of T rows each, group s reading slice s of every row of x and of gate (the weight's tensor map then
      // has overlapping strides: rows H apart, slices H/S apart).
      DeviceRouting slices = device_routing(single_group(T));
      slices.num_experts = splits;
      slices.M = splits * T;
      slices.rows_per_group = T;
      Problem<T16, float> p{x.ptr<const T16>(), H, RowMap::identity, gate.ptr<const T16>(), H, slice, RowMap::identity,
                            partial.as<float>(), E, 0, RowMap::identity, nullptr, false, slices, 0, E, slice};
      p.a_k_split = true;
      GemmTiling single_ctas{};
      single_ctas.cluster_m = 1;  // the router's GEMM in pairs measured 9% slower (session 16)
      launched = launch_sm90(p, GemmKind::nt, splits, splits * T, single_ctas, stream);
      if (!launched) return;
      sum_partials(partial.as<float>(), logits.ptr<O>(), T * E, splits, stream);
    });
    if (launched) return;
  }
  gemm_nt(single_group(T), GemmNT{x, RowMap::identity, as_one_group(gate), logits, RowMap::identity, {}}, s);
}

void router_logits_backward(const Tensor& d_logits, const Tensor& x, const Tensor& gate, const Tensor& dx,
                            const Tensor& dgate, bool accumulate_dx, const Tensor& split_scratch, Stream s) {
  const cudaStream_t stream = stream_of(s);
  require_tensor_core_dtype("router_logits_backward", "x", x);
  // The products run on tensor cores in x's dtype: bring d_logits there first when it is float32.
  Tensor dl = d_logits;
  Scratch converted(d_logits.dtype != x.dtype ? d_logits.numel() * dtype_size(x.dtype) : 0, stream);
  if (d_logits.dtype != x.dtype) {
    dl = Tensor::contiguous(converted.as<void>(), x.dtype, {d_logits.shape[0], d_logits.shape[1]}, x.device);
    const int64_t n = d_logits.numel();
    if (n > 0)
      visit_floats([&](auto in_tag, auto out_tag) {
        using In = decltype(in_tag);
        using Out = decltype(out_tag);
        convert_kernel<In, Out><<<blocks_for(n, 256), 256, 0, stream>>>(d_logits.ptr<const In>(), dl.ptr<Out>(), n);
        check_launch("convert_kernel");
      }, d_logits.dtype, x.dtype);
  }
  const Routing one = single_group(x.shape[0]);
  if (dgate.defined())  // dgate[e, h] = Σ_t dl[t, e] · x[t, h]
    gemm_tn(one, GemmTN{dl, RowMap::identity, x, RowMap::identity, as_one_group(dgate), {}, split_scratch}, s);
  if (dx.defined())  // dx[t, h] (+)= Σ_e dl[t, e] · gate[e, h]
    gemm_nn(one, GemmNN{dl, RowMap::identity, as_one_group(gate), dx, RowMap::identity, accumulate_dx}, s);
}

}  // namespace fusedmoe::detail::cuda
