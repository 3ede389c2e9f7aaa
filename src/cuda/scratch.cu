// The CUDA backend's scratch memory pool (one per device): stream-ordered allocations whose pages stay with
// the pool between calls, as PyTorch's caching allocator keeps its blocks, until release_scratch_memory().
#include <mutex>

#include "common.cuh"

namespace fusedmoe {
namespace detail::cuda {
namespace {

std::mutex pools_mutex;
cudaMemPool_t pools[kCachedDevices] = {};

cudaMemPool_t pool_of(int device) {
  std::lock_guard<std::mutex> lock(pools_mutex);
  if (pools[device] == nullptr) {
    cudaMemPoolProps props{};
    props.allocType = cudaMemAllocationTypePinned;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = device;
    cudaMemPool_t pool = nullptr;
    check_cuda(cudaMemPoolCreate(&pool, &props), "cudaMemPoolCreate (scratch pool)");
    // Keep every page between calls (the default threshold, 0, returns them at each synchronisation).
    uint64_t keep = UINT64_MAX;
    check_cuda(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep),
               "cudaMemPoolSetAttribute (scratch pool)");
    pools[device] = pool;
  }
  return pools[device];
}

}  // namespace

void* scratch_alloc(size_t bytes, cudaStream_t stream) {
  void* ptr = nullptr;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  check_cuda(cudaStreamIsCapturing(stream, &capture), "cudaStreamIsCapturing");
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  if (capture != cudaStreamCaptureStatusNone || device < 0 || device >= kCachedDevices) {
    check_cuda(cudaMallocAsync(&ptr, bytes, stream), "cudaMallocAsync (scratch)");
  } else {
    check_cuda(cudaMallocFromPoolAsync(&ptr, bytes, pool_of(device), stream), "cudaMallocFromPoolAsync (scratch)");
  }
  return ptr;
}

void release_scratch_pools() {
  std::lock_guard<std::mutex> lock(pools_mutex);
  for (cudaMemPool_t pool : pools)
    if (pool != nullptr) check_cuda(cudaMemPoolTrimTo(pool, 0), "cudaMemPoolTrimTo (scratch pool)");
}

}  // namespace detail::cuda
}  // namespace fusedmoe
