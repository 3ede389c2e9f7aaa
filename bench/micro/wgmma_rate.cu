// How fast can one or two warpgroups drive an SM's tensor cores with wgmma, both operands in shared memory?
//
// The grouped GEMM's design rests on this: sessions 7 and 9 measured ping-pong kernels (one warpgroup in its
// mainloop while the other runs its epilogue) at about half the tensor-core rate per k-step, and concluded that an
// epilogue overlap needs both warpgroups issuing at every moment. Those kernels also had a producer, barriers and
// global traffic; this benchmark has none of them. Operands sit in shared memory as in the GEMM (K-major, 128-byte
// swizzle, four rotating 48 KB "stages" so that addresses change like the pipeline's), nothing is loaded, and each
// warpgroup only issues wgmma, commits one group per 64-deep k-step and waits with a given depth. The last rows
// let the second warpgroup store (global, shared, or both) while the first issues alone: does an epilogue in one
// warpgroup slow the other's tensor-core work?
//
// The last rows sweep one m64nNk16 per warpgroup over N = 16 … 256 (the wrappers of src/cuda/wgmma.cuh): the rate a
// tiling with the tokens as wgmma's N, sized per group in steps of 8, would run its MMAs at (NOTES, session 29).
//
// Build and run on an sm_90a GPU: scripts/gpu_micro.sh (nvcc, no other dependency). Output: per shape, the
// cycles per 64-deep k-step (median over the CTAs, one per SM) and the share of the SM's tensor-core peak
// (kMacPerCycle) that implies.
#include <cuda_bf16.h>

#include <algorithm>
#include <utility>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../../src/cuda/sm90_primitives.cuh"
#include "../../src/cuda/wgmma.cuh"  // m64nNk16 for every N of the sweep too

using namespace fusedmoe::detail::cuda::sm90;

namespace {

constexpr int kStages = 4, kATileBytes = 128 * 128, kBTileBytes = 256 * 128;
constexpr int kStageBytes = kATileBytes + kBTileBytes;
// Dense bf16 tensor-core peak of an sm_90 SM: 989.4 TFLOP/s at 1830 MHz on 132 SMs = 4096 FLOP = 2048 MACs a cycle.
constexpr double kMacPerCycle = 2048.0;

// What each warpgroup multiplies per 16-deep step.
enum Shape : int {
  kN256 = 0,    // one m64n256k16: 64 rows × 256 columns (the cooperative kernel's half of a 128 × 256 tile)
  kN128x2 = 1,  // two m64n128k16 on rows 0-63 and 64-127: a whole 128 × 128 tile (session 9's ping-pong, v17)
  kN128 = 2,    // one m64n128k16: 64 rows × 128 columns
  kNSweep = 3,  // one m64nNk16, N = the kernel's kN: a tile whose token side is N (weights as the 64 rows, per
                // warpgroup), sized per group in steps of 8, so that a group's last tile pads fewer than 128 rows
};

constexpr double macs_per_kstep(int shape, int n) {
  return shape == kN128 ? 64.0 * 128 * 64 : shape == kNSweep ? 64.0 * n * 64 : 64.0 * 256 * 64;
}

// What the second warpgroup does while the first issues wgmma alone (a ping-pong kernel's other warpgroup in its
// epilogue): nothing, 16-byte global stores (a tile's output leaving), a shared-memory round trip (staging), or both.
enum Storer : int { kNoStorer = 0, kGlobalStores = 1, kSmemRoundTrip = 2, kStagedStores = 3 };
constexpr int kStoreScratchBytes = 16 * 1024;  // beside the stages
constexpr int kSmemBytes = kStages * kStageBytes + kStoreScratchBytes + 16 + 1024;
constexpr int64_t kStoreWindow = 4 << 20;      // per CTA: 132 × 4 MB, past L2, so the stores reach memory

template <int kShape, int kWait, int kN = 256>
__global__ void __launch_bounds__(256, 1)
    wgmma_rate_kernel(long long* cycles, int ksteps, int warpgroups, int storer, uint8_t* store_buf, long long* stored) {
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  // Small finite values (the data does not change the timing, but keeps the accumulators finite).
  auto* e = reinterpret_cast<__nv_bfloat16*>(smem);
  for (int i = threadIdx.x; i < kStages * kStageBytes / 2; i += blockDim.x) e[i] = __float2bfloat16((i % 13) * 1e-3f);
  fence_proxy_async();
  __syncthreads();
  const int wg = threadIdx.x / 128;
  volatile int* done = reinterpret_cast<volatile int*>(smem + kStages * kStageBytes + kStoreScratchBytes);
  if (threadIdx.x == 0) *done = 0;
  __syncthreads();
  if (wg == warpgroups && storer != kNoStorer) {
    // Store 64 KB (a 128 × 256 bf16 tile) per round until the wgmma warpgroup is done, and count the bytes.
    const int tid = threadIdx.x % 128;
    const uint32_t scratch = smem_u32(smem + kStages * kStageBytes);
    uint8_t* window = store_buf + blockIdx.x * kStoreWindow;
    uint4 v = make_uint4(tid, tid + 1, tid + 2, tid + 3);
    long long rounds = 0;
    const long long t0 = clock64();
    for (int64_t off = 0; !*done; off = (off + 65536) % kStoreWindow, ++rounds) {
#pragma unroll 4
      for (int i = 0; i < 32; ++i) {
        if (storer & kSmemRoundTrip) {
          const uint32_t at = scratch + (i % 8) * 2048 + tid * 16, from = scratch + (i % 8) * 2048 + (tid ^ 1) * 16;
          asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(at), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
                       : "memory");
          asm volatile("bar.sync 2, 128;\n" ::: "memory");
          asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                       : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(from) : "memory");
        }
        if (storer & kGlobalStores) *reinterpret_cast<uint4*>(window + off + i * 2048 + tid * 16) = v;
      }
    }
    const long long t1 = clock64();
    if (tid == 0) stored[blockIdx.x * 2] = rounds * 65536, stored[blockIdx.x * 2 + 1] = t1 - t0;
    return;
  }
  if (wg >= warpgroups) return;
  float acc[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) acc[i] = 0.f;
  auto& lo = *reinterpret_cast<float(*)[64]>(acc);
  auto& hi = *reinterpret_cast<float(*)[64]>(acc + 64);
  const uint32_t base = smem_u32(smem);
  asm volatile("bar.sync 1, %0;\n" ::"r"(warpgroups * 128));  // the warpgroups start together
  const long long t0 = clock64();
  for (int kt = 0; kt < ksteps; ++kt) {
    const uint32_t a = base + (kt % kStages) * kStageBytes, b = a + kATileBytes;
    wgmma_fence();
#pragma unroll
    for (int k16 = 0; k16 < 4; ++k16) {
      const uint64_t db = smem_desc(b + k16 * 32, 16, 1024);
      if constexpr (kShape == kN256) {
        Wgmma<__nv_bfloat16, 256>::mma<0, 0>(acc, smem_desc(a + wg * 64 * 128 + k16 * 32, 16, 1024), db);
      } else if constexpr (kShape == kN128x2) {
        Wgmma<__nv_bfloat16, 128>::mma<0, 0>(lo, smem_desc(a + k16 * 32, 16, 1024), db);
        Wgmma<__nv_bfloat16, 128>::mma<0, 0>(hi, smem_desc(a + 64 * 128 + k16 * 32, 16, 1024), db);
      } else if constexpr (kShape == kNSweep) {
        Wgmma<__nv_bfloat16, kN>::mma<0, 0>(*reinterpret_cast<float(*)[kN / 2]>(acc),
                                            smem_desc(a + wg * 64 * 128 + k16 * 32, 16, 1024), db);
      } else {
        Wgmma<__nv_bfloat16, 128>::mma<0, 0>(lo, smem_desc(a + wg * 64 * 128 + k16 * 32, 16, 1024), db);
      }
    }
    wgmma_commit();
    wgmma_wait<kWait>();
  }
  wgmma_wait<0>();
  pin_registers(acc);
  const long long t1 = clock64();
  if (threadIdx.x == 0) *done = 1;
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < 128; ++i) sum += acc[i];
  if (threadIdx.x % 128 == 0) cycles[blockIdx.x * 2 + wg] = (t1 - t0) + (sum == 1234.5f ? 1 : 0);
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

template <int kShape, int kWait, int kN = 256>
void run(const char* name, int warpgroups, int ctas, int ksteps, int storer = kNoStorer) {
  auto kernel = wgmma_rate_kernel<kShape, kWait, kN>;
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes), "smem attribute");
  long long *d = nullptr, *d_stored = nullptr;
  uint8_t* store_buf = nullptr;
  check(cudaMalloc(&d, sizeof(long long) * 2 * ctas), "cudaMalloc");
  check(cudaMalloc(&d_stored, sizeof(long long) * 2 * ctas), "cudaMalloc");
  if (storer & kGlobalStores) check(cudaMalloc(&store_buf, kStoreWindow * ctas), "cudaMalloc");
  std::vector<long long> h(2 * ctas), h_stored(2 * ctas);
  for (int rep = 0; rep < 2; ++rep) {  // the first launch warms up the clocks
    kernel<<<ctas, 256, kSmemBytes>>>(d, ksteps, warpgroups, storer, store_buf, d_stored);
    check(cudaGetLastError(), "launch");
    check(cudaDeviceSynchronize(), "kernel");
  }
  check(cudaMemcpy(h.data(), d, sizeof(long long) * 2 * ctas, cudaMemcpyDeviceToHost), "copy back");
  check(cudaMemcpy(h_stored.data(), d_stored, sizeof(long long) * 2 * ctas, cudaMemcpyDeviceToHost), "copy back");
  cudaFree(d);
  cudaFree(d_stored);
  cudaFree(store_buf);
  std::vector<double> per_kstep;
  for (int c = 0; c < ctas; ++c)
    for (int w = 0; w < warpgroups; ++w) per_kstep.push_back(static_cast<double>(h[c * 2 + w]) / ksteps);
  std::sort(per_kstep.begin(), per_kstep.end());
  const double median = per_kstep[per_kstep.size() / 2];
  const double ideal = warpgroups * macs_per_kstep(kShape, kN) / kMacPerCycle;  // both warpgroups share the SM
  std::printf("%-34s wait<%d>  warpgroups %d  CTAs %3d: %7.1f cycles per k-step (ideal %5.0f): tensor cores %5.1f%%"
              "  [min %.1f, max %.1f]\n",
              name, kWait, warpgroups, ctas, median, ideal, 100.0 * ideal / median, per_kstep.front(), per_kstep.back());
  if (storer != kNoStorer) {
    std::vector<double> rate;  // the other warpgroup's bytes per cycle
    for (int c = 0; c < ctas; ++c) rate.push_back(static_cast<double>(h_stored[2 * c]) / std::max(1LL, h_stored[2 * c + 1]));
    std::sort(rate.begin(), rate.end());
    static const char* kNames[] = {"", "global stores", "smem round trips", "smem + global stores"};
    std::printf("%34s   ... while the other warpgroup ran %s: %.1f bytes per cycle (median over CTAs)\n", "",
                kNames[storer], rate[rate.size() / 2]);
  }
}

template <int... N>
void n_sweep(std::integer_sequence<int, N...>, int sms, int ksteps) {
  char name[48];
  ((std::snprintf(name, sizeof name, "m64n%dk16 (N sweep)", N), run<kNSweep, 1, N>(name, 2, sms, ksteps)), ...);
}

}  // namespace

int main(int argc, char** argv) {
  const int ksteps = argc > 1 ? std::atoi(argv[1]) : 8192;
  int device = 0, sms = 0;
  check(cudaGetDevice(&device), "device");
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "SM count");
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, device), "properties");
  std::printf("%s, %d SMs; %d k-steps of 64 per warpgroup; one CTA per SM\n", prop.name, sms, ksteps);
  for (int ctas : {sms, 1}) {
    run<kN256, 1>("m64n256k16 (128x256 coop half)", 2, ctas, ksteps);
    run<kN256, 1>("m64n256k16 alone", 1, ctas, ksteps);
    run<kN256, 0>("m64n256k16 alone", 1, ctas, ksteps);
    run<kN128x2, 1>("2 x m64n128k16 (128x128 per WG)", 1, ctas, ksteps);
    run<kN128x2, 0>("2 x m64n128k16 (128x128 per WG)", 1, ctas, ksteps);
    run<kN128x2, 1>("2 x m64n128k16 (128x128 per WG)", 2, ctas, ksteps);
    run<kN128, 1>("m64n128k16 alone", 1, ctas, ksteps);
    run<kN128, 1>("m64n128k16", 2, ctas, ksteps);
    for (int storer : {kGlobalStores, kSmemRoundTrip, kStagedStores})
      run<kN256, 1>("m64n256k16 alone + a storing WG", 1, ctas, ksteps, storer);
  }
  // The N sweep, two warpgroups as the cooperative kernel runs them, every SM: does a narrower token side keep the
  // tensor cores' rate per MAC (what a per-group N would save in padded rows, it must not lose per instruction)?
  n_sweep(std::integer_sequence<int, 16, 32, 64, 96, 112, 128, 136, 160, 176, 192, 208, 216, 224, 240, 256>{}, sms,
          ksteps);
  return 0;
}
