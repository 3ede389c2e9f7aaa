// Shared pieces of the CUDA backend: error checks, dtype mapping, routing row maps with clamping, and
// stream-ordered scratch memory (graph-capturable).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <string>

#include "../backend.hpp"
#include "../numeric.hpp"
#include "fusedmoe/error.hpp"

namespace fusedmoe::detail::cuda {

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw Error(std::string(what) + ": " + cudaGetErrorString(err));
}
// After a launch: reports configuration errors at once (execution errors surface at the next sync).
inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

inline cudaStream_t stream_of(Stream s) { return static_cast<cudaStream_t>(s.handle); }

inline unsigned blocks_for(int64_t n, int per_block) { return static_cast<unsigned>((n + per_block - 1) / per_block); }

// Per-device caches (device info, shared-memory opt-ins, scratch pools) cover device ordinals below this;
// higher ones still work, uncached.
constexpr int kCachedDevices = 64;

// The current device's SM count, whether it is sm_90 (the wgmma kernels' target) and takes cooperative launches,
// queried once per device.
struct DeviceInfo {
  int sms = 0;
  bool sm90 = false;
  bool cooperative = false;  // cooperative launches (grid-wide barriers)
};
inline DeviceInfo current_device_info() {
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  auto query = [&] {
    int major = 0, minor = 0;
    DeviceInfo info;
    check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute");
    check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), "cudaDeviceGetAttribute");
    check_cuda(cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
    info.sm90 = major == 9 && minor == 0;
    int coop = 0;
    check_cuda(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device), "cudaDeviceGetAttribute");
    info.cooperative = coop != 0;
    return info;
  };
  static DeviceInfo cached[kCachedDevices];
  static std::once_flag queried[kCachedDevices];
  if (device < 0 || device >= kCachedDevices) return query();
  std::call_once(queried[device], [&] { cached[device] = query(); });
  return cached[device];
}

// Raises kernel kKernel's dynamic shared-memory limit to `bytes`, once per kernel and device: the driver call
// costs microseconds of host time, which sat in front of short kernels when it ran on every launch.
template <auto kKernel>
void allow_dynamic_smem(size_t bytes) {
  static std::atomic<bool> done[kCachedDevices] = {};
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  const bool cached = device >= 0 && device < kCachedDevices;
  if (cached && done[device].load(std::memory_order_acquire)) return;
  check_cuda(cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
             "cudaFuncSetAttribute");
  if (cached) done[device].store(true, std::memory_order_release);
}

// The grid for a kernel of kThreads-thread blocks whose blocks must all be resident at once (a grid stride, grid-wide
// barriers): `needed` blocks, or as many as the GPU holds at once if fewer (the kernel's occupancy, queried once per
// kernel; at least one block per SM).
template <auto kKernel, int kThreads>
unsigned resident_grid(int64_t needed, int sms) {
  static const int per_sm = [] {
    int n = 0;
    check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kKernel, kThreads, 0),
               "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    return n > 0 ? n : 1;
  }();
  return static_cast<unsigned>(std::min<int64_t>(needed, int64_t{per_sm} * sms));
}

// Inclusive prefix sum over the warp's 32 lanes in lane order (every lane must take part).
template <class V>
__device__ __forceinline__ V warp_inclusive_sum(V v, int lane) {
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const V o = __shfl_up_sync(0xffffffffu, v, d);
    if (lane >= d) v += o;
  }
  return v;
}

// True when environment variable `name` is set to `value` (the backend's debugging and tuning switches).
inline bool env_equals(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::string(v) == value;
}

// The CUDA backend computes its matrix products on tensor cores in 16-bit floats.
inline void require_tensor_core_dtype(const char* op, const char* name, const Tensor& t) {
  if (t.dtype != DType::bf16 && t.dtype != DType::f16)
    throw Error(std::string(op) + ": argument '" + name + "' on CUDA must be bfloat16 or float16, got " + t.describe() +
                " (float32 and float64 run on the CPU backend)");
}

// Stream-ordered allocation from the backend's own memory pool on the current device (scratch.cu), which
// keeps its pages between calls: the default pool hands its memory back to the driver at every
// synchronisation, and re-mapping it made each forward's first allocation (the sort's block counts) wait
// 100–260 µs on the host while the GPU idled (H100). Under CUDA-graph capture: the default pool
// (cudaMallocAsync), which capture turns into graph memory nodes.
void* scratch_alloc(size_t bytes, cudaStream_t stream);

// Stream-ordered scratch (scratch_alloc / cudaFreeAsync), so it is legal inside CUDA-graph capture.
class Scratch {
 public:
  Scratch(size_t bytes, cudaStream_t stream) : stream_(stream) {
    if (bytes) ptr_ = scratch_alloc(bytes, stream);
  }
  ~Scratch() {
    if (ptr_) cudaFreeAsync(ptr_, stream_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <class T> T* as() const { return static_cast<T*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
};

// Scratch a caller may lend: `lent` where it is defined (and `bytes` > 0), which must hold `bytes` of `dtype`
// 16-byte aligned (else an Error naming `what`); otherwise `bytes` from the backend's pool.
class LentOrPooled {
 public:
  LentOrPooled(const Tensor& lent, DType dtype, size_t bytes, cudaStream_t stream, const char* what)
      : use_lent_(bytes > 0 && lent.defined()), pooled_(use_lent_ ? 0 : bytes, stream) {
    if (use_lent_ && (lent.dtype != dtype || lent.nbytes() < bytes || reinterpret_cast<uintptr_t>(lent.data) % 16 != 0))
      throw Error(std::string(what) + ": the lent scratch must hold " + std::to_string(bytes) + " bytes of " +
                  dtype_name(dtype) + ", 16-byte aligned, got " + lent.describe());
    ptr_ = use_lent_ ? lent.data : pooled_.as<void>();
  }
  template <class T> T* as() const { return static_cast<T*>(ptr_); }

 private:
  bool use_lent_;
  Scratch pooled_;
  void* ptr_ = nullptr;
};

// Scalar conversions between storage types and float on the device.
template <class T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f32<double>(double v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <class T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_f32<double>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

// V consecutive elements of a row, held as float: 16-byte loads and stores for V = 8 of 16-bit data (what a
// memory-bound pass needs to keep enough bytes in flight; the row start must be 16-byte aligned), else one
// element at a time.
template <int V, class T>
struct Lanes {
  float v[V];
  __device__ __forceinline__ void load(const T* p) {
    if constexpr (V == 8 && sizeof(T) == 2) {
      const uint4 raw = *reinterpret_cast<const uint4*>(p);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = to_f32(e[i]);
    } else if constexpr (V == 8 && sizeof(T) == 4) {
      const float4 lo = reinterpret_cast<const float4*>(p)[0], hi = reinterpret_cast<const float4*>(p)[1];
      v[0] = lo.x, v[1] = lo.y, v[2] = lo.z, v[3] = lo.w, v[4] = hi.x, v[5] = hi.y, v[6] = hi.z, v[7] = hi.w;
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) v[i] = to_f32(p[i]);
    }
  }
  __device__ __forceinline__ void store(T* p) const {
    if constexpr (V == 8 && sizeof(T) == 2) {
      uint4 raw;
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int i = 0; i < 8; ++i) e[i] = from_f32<T>(v[i]);
      *reinterpret_cast<uint4*>(p) = raw;
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) p[i] = from_f32<T>(v[i]);
    }
  }
};

// Calls fn(T{}) with the CUDA storage type of a floating dtype.
template <class Fn>
void visit_float(DType dt, Fn&& fn) {
  switch (dt) {
    case DType::f32: fn(float{}); return;
    case DType::f64: fn(double{}); return;
    case DType::bf16: fn(__nv_bfloat16{}); return;
    case DType::f16: fn(__half{}); return;
    default: throw Error(std::string("internal: expected a floating dtype, got ") + dtype_name(dt));
  }
}

// Calls fn(T1{}, T2{}, …) with the CUDA storage types of several floating dtypes, in order (one
// instantiation per combination, as nested visit_float calls would make).
template <class Fn>
void visit_floats(Fn&& fn) { fn(); }
template <class Fn, class... Rest>
void visit_floats(Fn&& fn, DType first, Rest... rest) {
  visit_float(first, [&](auto tag) { visit_floats([&](auto... tags) { fn(tag, tags...); }, rest...); });
}

// Device view of the routing metadata. Values coming from device memory are clamped before use, so
// corrupt metadata produces wrong numbers but never an out-of-bounds access.
struct DeviceRouting {
  const int32_t* offsets;  // [E+1]
  const int32_t* gather;   // [M] or nullptr
  int num_experts;
  int64_t M;
  int64_t rows_per_group;  // without offsets: group e covers rows [e·rows_per_group, (e+1)·rows_per_group) ∩ [0, M)
  num::FastDivU31 top_k_div;  // slot -> token (slot / top-k) by a multiply-shift (slots are int32 values: below 2^31)

  __device__ __forceinline__ int64_t offset(int e) const {
    const int64_t o = offsets ? offsets[e] : e * rows_per_group;
    return o < 0 ? 0 : (o > M ? M : o);
  }
  __device__ __forceinline__ int64_t clamp_slot(int64_t s) const { return s < 0 ? 0 : (s >= M ? M - 1 : s); }
  __device__ __forceinline__ int64_t slot(int64_t i) const { return clamp_slot(gather[i]); }
  __device__ __forceinline__ int64_t token_of(int64_t slot) const { return top_k_div(static_cast<uint32_t>(slot)); }
  // The row `map` gives routed row i, whose clamped slot (read only by the token and slot maps) is `slot`.
  __device__ __forceinline__ int64_t row_of(RowMap map, int64_t i, int64_t slot) const {
    switch (map) {
      case RowMap::token: return token_of(slot);
      case RowMap::slot: return slot;
      default: return i;
    }
  }
  __device__ __forceinline__ int64_t row(RowMap map, int64_t i) const {
    return row_of(map, i, map == RowMap::identity ? 0 : slot(i));
  }
};

inline DeviceRouting device_routing(const Routing& r) {
  return {r.expert_offsets.defined() ? r.expert_offsets.ptr<const int32_t>() : nullptr,
          r.gather_indices.defined() ? r.gather_indices.ptr<const int32_t>() : nullptr, r.num_experts, r.M, r.M,
          num::FastDivU31(static_cast<uint32_t>(r.top_k > 0 ? r.top_k : 1))};
}

}  // namespace fusedmoe::detail::cuda
