// wgmma issue helpers and the shared-memory matrix descriptor (sm_90a), shared by the grouped GEMM kernels and
// the tensor-core rate microbenchmark (bench/micro/wgmma_rate.cu).
#pragma once

#include <cstdint>

namespace fusedmoe::detail::cuda::sm90 {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// Data written through the generic proxy (threads' stores, cp.async) is read by wgmma through the async proxy.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
// Keeps the compiler from moving accumulator reads or writes across the asynchronous wgmma boundary.
template <int R>
__device__ __forceinline__ void pin_registers(float (&acc)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(acc[i])::"memory");
}

// Shared-memory matrix descriptor, 128-byte swizzle. K-major: rows of 128 bytes, 8-row groups every
// `sbo` bytes (lbo unused). MN-major: 64-element blocks along M/N every `lbo` bytes, 8-deep groups along
// K every `sbo` bytes.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(lbo >> 4) << 16) |
         (static_cast<uint64_t>(sbo >> 4) << 32) | (1ull << 62);
}

}  // namespace fusedmoe::detail::cuda::sm90
