// The sm_90a GEMMs' staged epilogue slice (store_slice) and its helpers, shared by gemm_sm90.cu and the synthetic
// grouped GEMM of bench/micro/pipeline_rate.cu (which models the real epilogue with this very code).
#pragma once

#include <cstdint>

#include "common.cuh"
#include "sm90_primitives.cuh"

namespace fusedmoe::detail::cuda::sm90 {

// The epilogue writes through shared memory so that global stores are whole 128-byte rows: a warp stages an
// 8-row × 128-byte slice of its accumulator fragment (rows lane/4, column pairs (lane%4)·2 of each 8-column
// group; 16-bit outputs by stmatrix), then each lane stores 16 bytes of it, four full rows per instruction.
// Storing the fragment directly gave 4-byte stores touching 8 rows each, four times the store instructions
// and L2 requests. The row pitch is padded (16 bytes for 16-bit outputs, 32 for float) so the staging
// writes hit 32 distinct banks.
template <class OutT>
struct Slice {
  static constexpr int kCols = 128 / static_cast<int>(sizeof(OutT));  // output columns per slice
  static constexpr int kPitch = 128 + (sizeof(OutT) == 2 ? 16 : 32);
  static constexpr int kBytes = 8 * kPitch;                            // one warp's staging area
};

// Four 8 × 8 matrices of 16-bit values into shared memory, each lane holding one row pair (row lane/4, columns
// (lane%4)·2, +1: the mma fragment layout) of each; lane t gives the address of row t%8 of matrix t/8, 16
// contiguous bytes. kTrans stores each matrix transposed (its column i becomes the row at lane i's address).
// One instruction per lane for 8 values, against one 4-byte (or with kTrans 2-byte) store per 2 (or 1).
template <bool kTrans>
__device__ __forceinline__ void stmatrix_x4(uint32_t addr, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
  if constexpr (kTrans)
    asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(r0), "r"(r1),
                 "r"(r2), "r"(r3) : "memory");
  else
    asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(r0), "r"(r1),
                 "r"(r2), "r"(r3) : "memory");
}

template <class OutT>
__device__ __forceinline__ uint32_t pack2(float x, float y) {
  OutT pair[2] = {from_f32<OutT>(x), from_f32<OutT>(y)};
  return *reinterpret_cast<const uint32_t*>(pair);
}

template <class OutT>
__device__ __forceinline__ uint4 add_vec16(uint4 a, uint4 b) {
  OutT* x = reinterpret_cast<OutT*>(&a);
  const OutT* y = reinterpret_cast<const OutT*>(&b);
#pragma unroll
  for (int i = 0; i < static_cast<int>(16 / sizeof(OutT)); ++i) x[i] = from_f32<OutT>(to_f32(x[i]) + to_f32(y[i]));
  return a;
}

// The rows a lane stores in each slice of its warp's 8 rows (rows lane/8 and lane/8 + 4: four 16-byte pieces of
// two rows per store instruction), from every lane's own row offset (row lane/4, the fragment's). Taken once for all
// the slices of a row group: as two 64-bit shuffles inside every slice, behind its __syncwarp, the compiler could not
// merge them, and a 128 × 256 tile's epilogue ran eight times the shuffles with a branch around each store.
struct SliceRows {
  int64_t off[2];
};
__device__ __forceinline__ SliceRows slice_rows(int lane, int64_t row_off) {
  SliceRows rows;
#pragma unroll
  for (int it = 0; it < 2; ++it) rows.off[it] = __shfl_sync(0xffffffffu, row_off, (lane / 8 + 4 * it) * 4);
  return rows;
}

// One slice: value(jj) is the lane's float pair of column group jj (columns jj·8 + (lane%4)·2, +1) of its row;
// rows (slice_rows) the element offsets in `base` of the rows the lane stores, < 0 for rows not stored. Columns
// col0 … col0 + kCols are stored where below `cols`. stage == nullptr stores zeros (an empty reduction).
// (rows_of() gives them after the staging, where a caller's shuffles cost no registers across it.)
template <class OutT, class Value, class Rows>
__device__ __forceinline__ void store_slice_rows_of(uint8_t* stage, int lane, const Value& value, const Rows& rows_of,
                                                    OutT* base, int64_t col0, int64_t cols, bool accumulate) {
  using S = Slice<OutT>;
  if (stage != nullptr) {
    if constexpr (sizeof(OutT) == 2) {
      // The slice's 8 column groups are 8 matrices of 8 rows × 16 bytes: two stmatrix.x4 per lane.
      const uint32_t row = smem_u32(stage) + (lane % 8) * S::kPitch;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        uint32_t r[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float2 v = value(half * 4 + i);
          r[i] = pack2<OutT>(v.x, v.y);
        }
        stmatrix_x4<false>(row + (half * 4 + lane / 8) * 16, r[0], r[1], r[2], r[3]);
      }
    } else {
      float* row = reinterpret_cast<float*>(stage + (lane / 4) * S::kPitch) + (lane % 4) * 2;
#pragma unroll
      for (int jj = 0; jj < S::kCols / 8; ++jj) *reinterpret_cast<float2*>(row + jj * 8) = value(jj);
    }
    __syncwarp();
  } else if (accumulate) {
    return;  // C += 0
  }
  const SliceRows rows = rows_of();
  const int piece = lane % 8;  // 16-byte piece of a 128-byte row
  const int64_t col = col0 + piece * (16 / static_cast<int>(sizeof(OutT)));
#pragma unroll
  for (int it = 0; it < 2; ++it) {
    const int r = lane / 8 + 4 * it;
    const int64_t off = rows.off[it];
    if (off >= 0 && col < cols) {
      uint4 v = make_uint4(0, 0, 0, 0);
      if (stage != nullptr) v = *reinterpret_cast<const uint4*>(stage + r * S::kPitch + piece * 16);
      uint4* dst = reinterpret_cast<uint4*>(base + off + col);
      if (accumulate) v = add_vec16<OutT>(v, *dst);
      *dst = v;
    }
  }
  __syncwarp();  // the staging area is rewritten by the next slice
}
template <class OutT, class Value>
__device__ __forceinline__ void store_slice(uint8_t* stage, int lane, const Value& value, const SliceRows& rows,
                                            OutT* base, int64_t col0, int64_t cols, bool accumulate) {
  store_slice_rows_of<OutT>(stage, lane, value, [&] { return rows; }, base, col0, cols, accumulate);
}
// The same, the rows shuffled from each lane's own row offset inside the slice, after its staging (for callers that
// cannot hold the shuffled rows of all their row groups: GEMM1's gated epilogue, whose registers are full).
template <class OutT, class Value>
__device__ __forceinline__ void store_slice(uint8_t* stage, int lane, const Value& value, int64_t row_off, OutT* base,
                                            int64_t col0, int64_t cols, bool accumulate) {
  store_slice_rows_of<OutT>(stage, lane, value, [&] { return slice_rows(lane, row_off); }, base, col0, cols, accumulate);
}

}  // namespace fusedmoe::detail::cuda::sm90
