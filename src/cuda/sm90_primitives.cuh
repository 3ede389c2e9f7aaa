// sm_90a building blocks shared by the grouped GEMM kernels and the microbenchmarks (bench/micro): mbarriers,
// TMA and cp.async loads, wgmma issue and the shared-memory matrix descriptor.
#pragma once

#include <cuda.h>  // CUtensorMap

#include <cstdint>

namespace fusedmoe::detail::cuda::sm90 {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// Data written through the generic proxy (threads' stores, cp.async) is read by wgmma through the async proxy.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Spins until the barrier's phase of the given parity completed. kClusterAcquire: acquire at cluster scope, to see
// what a peer CTA wrote into this CTA's shared memory before its release.cluster arrival.
template <bool kClusterAcquire = false>
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
#define FUSEDMOE_MBAR_WAIT(sem)                                                      \
  asm volatile(                                                                      \
      "{\n.reg .pred done;\n"                                                        \
      "WAIT:\n"                                                                      \
      "mbarrier.try_wait.parity" sem ".shared::cta.b64 done, [%0], %1;\n"            \
      "@!done bra WAIT;\n}\n" ::"r"(bar),                                            \
      "r"(parity)                                                                    \
      : "memory")
  if constexpr (kClusterAcquire) FUSEDMOE_MBAR_WAIT(".acquire.cluster"); else FUSEDMOE_MBAR_WAIT("");
#undef FUSEDMOE_MBAR_WAIT
}

__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// 16 bytes global -> shared; zero-filled (nothing read) when !valid.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}

// TMA: box (c0, c1, c2) of a 3-D tensor map into shared memory at `dst`, the barrier at `bar` receiving the
// bytes; with kCluster > 1 into every CTA of the cluster (same offsets in each).
template <int kCluster>
__device__ __forceinline__ void tma_load(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1, int c2) {
  if constexpr (kCluster == 1)
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], [%2];\n"
        ::"r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2)
        : "memory");
  else
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
        " [%0], [%1, {%3, %4, %5}], [%2], %6;\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "h"(static_cast<uint16_t>((1u << kCluster) - 1))
        : "memory");
}

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
