// Host side of the sm_90a GEMMs' TMA: the driver's tensor-map encoder and the 3-D, 128-byte-swizzled maps of their
// operands; shared by gemm_sm90.cu and the synthetic grouped GEMM of bench/micro/pipeline_rate.cu.
#pragma once

#include <cuda.h>          // CUtensorMap
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled

#include <string>
#include <type_traits>

#include "common.cuh"

namespace fusedmoe::detail::cuda::sm90 {

// cuTensorMapEncodeTiled from the driver, found through the runtime (no link-time dependency on libcuda).
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    check_cuda(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found),
               "cudaGetDriverEntryPointByVersion(cuTensorMapEncodeTiled)");
    if (found != cudaDriverEntryPointSuccess || fn == nullptr)
      throw Error("the CUDA driver provides no cuTensorMapEncodeTiled (TMA needs CUDA 12 or newer)");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

// The tensor-map encoder is a driver call and needs a current context; a thread that has launched nothing yet
// (the autograd engine's backward thread, say) may have none: bind the current device's primary context once.
inline void bind_context_once() {
  thread_local bool context_bound = false;
  if (!context_bound) {
    int device = 0;
    check_cuda(cudaGetDevice(&device), "cudaGetDevice");
    check_cuda(cudaSetDevice(device), "cudaSetDevice");
    context_bound = true;
  }
}

// A 3-D tensor map over `base` (dims: contiguous, rows, third; byte strides of rows and third), 128-byte
// swizzled boxes; elements past the dims read as zeros.
template <class T>
CUtensorMap encode_tensor_map(const T* base, const cuuint64_t (&dims)[3], const cuuint64_t (&strides)[2],
                              const cuuint32_t (&box)[3], const char* what) {
  bind_context_once();
  CUtensorMap map;
  const cuuint32_t unit[3] = {1, 1, 1};
  const CUresult rc = tensor_map_encoder()(
      &map, std::is_same_v<T, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3,
      const_cast<T*>(base), dims, strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (rc != CUDA_SUCCESS) throw Error(std::string("cuTensorMapEncodeTiled (") + what + "): error " + std::to_string(rc));
  return map;
}

}  // namespace fusedmoe::detail::cuda::sm90
