// Elementwise kernels: SiLU·mul forward/backward, the routed backward pass that yields dw, dY1 and w·A
// in one read of Y1, and the top-k combine forward/backward. Reductions use fixed-order trees.
#include <algorithm>
#include <cstdint>

#include "../activation.hpp"
#include "common.cuh"
#include "slot_sum.cuh"

namespace fusedmoe::detail::cuda {

namespace {

constexpr int kThreads = 256;

// Row kernels: one warp per row, each lane moving V consecutive columns per step (V = 8: 16-byte loads and
// stores of 16-bit data, which a memory-bound pass needs to keep enough bytes in flight; V = 1 where rows
// or pointers are not aligned for that). Per-row sums are fixed-order warp trees (deterministic).
constexpr int kRowsPerBlock = kThreads / 32;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(0xffffffffu, v, d);
  return v;
}

template <int V, class S, class O>
__global__ void silu_mul_kernel(const S* Y1, O* A, int64_t M, int64_t I) {
  const int64_t m = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (m >= M) return;
  const S* y = Y1 + m * 2 * I;
  for (int64_t c = (threadIdx.x % 32) * V; c < I; c += 32 * V) {
    Lanes<V, S> g, u;
    g.load(y + c), u.load(y + I + c);
    Lanes<V, O> a;
#pragma unroll
    for (int i = 0; i < V; ++i) a.v[i] = act::silu(g.v[i]) * u.v[i];
    a.store(A + m * I + c);
  }
}

template <int V, class D, class S, class O>
__global__ void silu_mul_backward_kernel(const D* dA, const S* Y1, O* dY1, int64_t M, int64_t I) {
  const int64_t m = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (m >= M) return;
  for (int64_t c = (threadIdx.x % 32) * V; c < I; c += 32 * V) {
    Lanes<V, S> g, u;
    Lanes<V, D> d;
    g.load(Y1 + m * 2 * I + c), u.load(Y1 + m * 2 * I + I + c), d.load(dA + m * I + c);
    Lanes<V, O> dg, du;
#pragma unroll
    for (int i = 0; i < V; ++i) act::silu_mul_grad(g.v[i], u.v[i], d.v[i], dg.v[i], du.v[i]);
    dg.store(dY1 + m * 2 * I + c), du.store(dY1 + m * 2 * I + I + c);
  }
}

// One warp per routed row m (expert order), w = the slot's routing weight, a = silu(g)·u as forward stored it:
//   scaled_act = w·a;  d_weights[slot] = Σ_c dA_raw·a;  dY1 = dsilu_mul(w·dA_raw).
template <int V, class S, class W, class R, class DW>
__global__ void routed_silu_backward_kernel(const DeviceRouting rt, const R* dA_raw, const S* Y1, const W* weights,
                                            S* dY1, S* scaled_act, DW* d_weights, int64_t I) {
  const int64_t m = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (m >= rt.M) return;
  const int64_t slot = rt.slot(m);
  const float w = to_f32(weights[slot]);
  float dw = 0.f;
  for (int64_t c = (threadIdx.x % 32) * V; c < I; c += 32 * V) {
    Lanes<V, S> g, u, a;
    g.load(Y1 + m * 2 * I + c), u.load(Y1 + m * 2 * I + I + c);
#pragma unroll
    for (int i = 0; i < V; ++i) a.v[i] = to_f32(from_f32<S>(act::silu(g.v[i]) * u.v[i]));
    if (scaled_act) {
      Lanes<V, S> wa;
#pragma unroll
      for (int i = 0; i < V; ++i) wa.v[i] = w * a.v[i];
      wa.store(scaled_act + m * I + c);
    }
    if (dA_raw) {
      Lanes<V, R> raw;
      raw.load(dA_raw + m * I + c);
      Lanes<V, S> dg, du;
#pragma unroll
      for (int i = 0; i < V; ++i) {
        dw += raw.v[i] * a.v[i];
        act::silu_mul_grad(g.v[i], u.v[i], w * raw.v[i], dg.v[i], du.v[i]);
      }
      if (dY1) dg.store(dY1 + m * 2 * I + c), du.store(dY1 + m * 2 * I + I + c);
    }
  }
  if (dA_raw && d_weights) {
    dw = warp_sum(dw);
    if (threadIdx.x % 32 == 0) d_weights[slot] = from_f32<DW>(dw);
  }
}

unsigned row_blocks(int64_t rows) { return static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock); }

// Calls fn(std::integral_constant<int, 8>) when every row start of every pointer is 16-byte aligned for
// 8-wide access (cols % 8 == 0, bases aligned), else fn(std::integral_constant<int, 1>).
template <class Fn>
void with_width(int64_t cols, std::initializer_list<const void*> ptrs, Fn&& fn) {
  bool wide = cols % 8 == 0;
  for (const void* p : ptrs) wide = wide && (reinterpret_cast<uintptr_t>(p) % 16 == 0);
  if (wide) fn(std::integral_constant<int, 8>{}); else fn(std::integral_constant<int, 1>{});
}

template <class G, class W, class O>
__global__ void topk_combine_grad_y_kernel(const G* dOut, const W* weights, O* dY2, int64_t T, int k, int64_t H) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= T * k * H) return;
  const int64_t f = idx / H, h = idx % H;
  dY2[idx] = from_f32<O>(to_f32(weights[f]) * to_f32(dOut[(f / k) * H + h]));
}

// Sum over the block in a fixed tree (deterministic).
__device__ float block_sum(float v) {
  __shared__ float warp_sums[kThreads / 32];
  v = warp_sum(v);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
  __syncthreads();
  return total;
}

template <class G, class Y, class O>
__global__ void topk_combine_grad_w_kernel(const G* dOut, const Y* Y2, O* dw, int k, int64_t H) {
  const int64_t f = blockIdx.x;
  float s = 0.f;
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) s += to_f32(dOut[(f / k) * H + h]) * to_f32(Y2[f * H + h]);
  s = block_sum(s);
  if (threadIdx.x == 0) dw[f] = from_f32<O>(s);
}

template <class T> const T* cptr(const Tensor& t) { return t.defined() ? t.ptr<const T>() : nullptr; }
template <class T> T* mptr(const Tensor& t) { return t.defined() ? t.ptr<T>() : nullptr; }
// Dtype of an optional tensor for dispatch (any float when undefined).
DType dtype_or(const Tensor& t, DType fallback) { return t.defined() ? t.dtype : fallback; }

}  // namespace

void silu_mul(const Tensor& Y1, const Tensor& A, Stream s) {
  const int64_t M = Y1.shape[0], I = A.shape[1];
  if (M * I == 0) return;
  visit_floats([&](auto s_tag, auto o_tag) {
    using S = decltype(s_tag);
    using O = decltype(o_tag);
    with_width(I, {Y1.data, A.data}, [&](auto v) {
      silu_mul_kernel<v(), S, O><<<row_blocks(M), kThreads, 0, stream_of(s)>>>(Y1.ptr<const S>(), A.ptr<O>(), M, I);
    });
    check_launch("silu_mul_kernel");
  }, Y1.dtype, A.dtype);
}

void silu_mul_backward(const Tensor& dA, const Tensor& Y1, const Tensor& dY1, Stream s) {
  const int64_t M = Y1.shape[0], I = dA.shape[1];
  if (M * I == 0) return;
  visit_floats([&](auto d_tag, auto s_tag, auto o_tag) {
    using D = decltype(d_tag);
    using S = decltype(s_tag);
    using O = decltype(o_tag);
    with_width(I, {dA.data, Y1.data, dY1.data}, [&](auto v) {
      silu_mul_backward_kernel<v(), D, S, O><<<row_blocks(M), kThreads, 0, stream_of(s)>>>(
          dA.ptr<const D>(), Y1.ptr<const S>(), dY1.ptr<O>(), M, I);
    });
    check_launch("silu_mul_backward_kernel");
  }, dA.dtype, Y1.dtype, dY1.dtype);
}

void routed_silu_backward(const Routing& r, const Tensor& dA_raw, const Tensor& Y1, const Tensor& weights,
                          const Tensor& dY1, const Tensor& scaled_act, const Tensor& d_weights, Stream s) {
  const int64_t M = Y1.shape[0], I = Y1.shape[1] / 2;
  if (M == 0) return;
  for (const Tensor* t : {&dY1, &scaled_act})
    if (t->defined() && t->dtype != Y1.dtype) throw Error("routed_silu_backward: outputs must have Y1's dtype");
  visit_floats([&](auto s_tag, auto w_tag, auto r_tag, auto dw_tag) {
    using S = decltype(s_tag);
    using W = decltype(w_tag);
    using R = decltype(r_tag);
    using DW = decltype(dw_tag);
    with_width(I, {dA_raw.data, Y1.data, dY1.data, scaled_act.data}, [&](auto v) {
      routed_silu_backward_kernel<v(), S, W, R, DW><<<row_blocks(M), kThreads, 0, stream_of(s)>>>(
          device_routing(r), cptr<R>(dA_raw), Y1.ptr<const S>(), weights.ptr<const W>(), mptr<S>(dY1),
          mptr<S>(scaled_act), mptr<DW>(d_weights), I);
    });
    check_launch("routed_silu_backward_kernel");
  }, Y1.dtype, weights.dtype, dtype_or(dA_raw, DType::f32), dtype_or(d_weights, DType::f32));
}

void topk_combine(const Tensor& Y2, const Tensor& weights, const Tensor& out, Stream s) {
  const int64_t T = weights.shape[0], H = Y2.shape[1];
  const int k = static_cast<int>(weights.shape[1]);
  visit_floats([&](auto y_tag, auto w_tag, auto o_tag) {
    using Y = decltype(y_tag);
    using W = decltype(w_tag);
    using O = decltype(o_tag);
    sum_slot_rows(Y2.ptr<const Y>(), weights.ptr<const W>(), out.ptr<O>(), T, k, H, false, stream_of(s));
  }, Y2.dtype, weights.dtype, out.dtype);
}

void topk_combine_backward(const Tensor& dOut, const Tensor& Y2, const Tensor& weights, const Tensor& dY2,
                           const Tensor& d_weights, Stream s) {
  const int64_t T = weights.shape[0], H = Y2.shape[1];
  const int k = static_cast<int>(weights.shape[1]);
  if (T == 0) return;
  if (dY2.defined() && H > 0)
    visit_floats([&](auto g_tag, auto w_tag, auto o_tag) {
      using G = decltype(g_tag);
      using W = decltype(w_tag);
      using O = decltype(o_tag);
      topk_combine_grad_y_kernel<G, W, O><<<blocks_for(T * k * H, kThreads), kThreads, 0, stream_of(s)>>>(
          dOut.ptr<const G>(), weights.ptr<const W>(), dY2.ptr<O>(), T, k, H);
      check_launch("topk_combine_grad_y_kernel");
    }, dOut.dtype, weights.dtype, dY2.dtype);
  if (d_weights.defined())
    visit_floats([&](auto g_tag, auto y_tag, auto o_tag) {
      using G = decltype(g_tag);
      using Y = decltype(y_tag);
      using O = decltype(o_tag);
      topk_combine_grad_w_kernel<G, Y, O><<<static_cast<unsigned>(T * k), kThreads, 0, stream_of(s)>>>(
          dOut.ptr<const G>(), Y2.ptr<const Y>(), d_weights.ptr<O>(), k, H);
      check_launch("topk_combine_grad_w_kernel");
    }, dOut.dtype, Y2.dtype, d_weights.dtype);
}

}  // namespace fusedmoe::detail::cuda
