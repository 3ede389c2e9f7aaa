#include <cstdlib>
#include <cstring>
#include <new>
#include <utility>
#include <sstream>

#include "fusedmoe/error.hpp"
#include "fusedmoe/tensor.hpp"
#include "backend.hpp"

#ifdef FUSEDMOE_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace fusedmoe {

size_t dtype_size(DType dt) {
  switch (dt) {
    case DType::f32: case DType::i32: return 4;
    case DType::f64: case DType::i64: return 8;
    case DType::bf16: case DType::f16: return 2;
  }
  return 0;
}

const char* dtype_name(DType dt) {
  switch (dt) {
    case DType::f32: return "float32";
    case DType::f64: return "float64";
    case DType::bf16: return "bfloat16";
    case DType::f16: return "float16";
    case DType::i32: return "int32";
    case DType::i64: return "int64";
  }
  return "?";
}

bool is_floating(DType dt) { return dt == DType::f32 || dt == DType::f64 || dt == DType::bf16 || dt == DType::f16; }

std::string device_name(const Device& d) {
  return d.type == DeviceType::cpu ? std::string("cpu") : "cuda:" + std::to_string(d.index);
}

Tensor Tensor::contiguous(void* data, DType dtype, std::initializer_list<int64_t> shape, Device device) {
  if (shape.size() == 0 || shape.size() > static_cast<size_t>(kMaxDims))
    throw Error("Tensor::contiguous: expected 1 to 4 dimensions, got " + std::to_string(shape.size()));
  Tensor t;
  t.data = data;
  t.dtype = dtype;
  t.device = device;
  t.ndim = static_cast<int>(shape.size());
  int i = 0;
  for (int64_t s : shape) {
    if (s < 0) throw Error("Tensor::contiguous: negative size " + std::to_string(s));
    t.shape[i++] = s;
  }
  int64_t stride = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {
    t.strides[d] = stride;
    stride *= t.shape[d];
  }
  return t;
}

int64_t Tensor::numel() const {
  if (ndim == 0) return 0;
  int64_t n = 1;
  for (int d = 0; d < ndim; ++d) n *= shape[d];
  return n;
}

bool Tensor::is_contiguous() const {
  int64_t expected = 1;
  for (int d = ndim - 1; d >= 0; --d) {
    if (shape[d] != 1 && strides[d] != expected) return false;
    expected *= shape[d];
  }
  return true;
}

std::string Tensor::describe() const {
  if (!defined()) return "an undefined tensor";
  std::ostringstream os;
  os << dtype_name(dtype) << "[";
  for (int d = 0; d < ndim; ++d) os << (d ? ", " : "") << shape[d];
  os << "] on " << device_name(device);
  if (!is_contiguous()) os << " (non-contiguous)";
  return os.str();
}

bool cuda_available() {
#ifdef FUSEDMOE_WITH_CUDA
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    cudaGetLastError();
    return false;
  }
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) return false;
  return prop.major == 9 && prop.minor == 0;
#else
  return false;
#endif
}

void release_scratch_memory() {
#ifdef FUSEDMOE_WITH_CUDA
  detail::cuda::release_scratch_pools();
#endif
}

Buffer::Buffer(size_t bytes, Device device) : bytes_(bytes), device_(device) {
  if (bytes == 0) return;
  if (device.type == DeviceType::cpu) {
    data_ = std::aligned_alloc(256, (bytes + 255) / 256 * 256);
    if (!data_) throw Error("Buffer: could not allocate " + std::to_string(bytes) + " bytes of host memory");
    return;
  }
#ifdef FUSEDMOE_WITH_CUDA
  int prev = 0;
  cudaGetDevice(&prev);
  cudaSetDevice(device.index);
  const cudaError_t err = cudaMalloc(&data_, bytes);
  cudaSetDevice(prev);
  if (err != cudaSuccess)
    throw Error("Buffer: cudaMalloc of " + std::to_string(bytes) + " bytes failed: " + cudaGetErrorString(err));
#else
  throw Error("Buffer: device " + device_name(device) + " requested, but fusedmoe was built without CUDA");
#endif
}

Buffer::~Buffer() {
  if (!data_) return;
  if (device_.type == DeviceType::cpu) {
    std::free(data_);
  } else {
#ifdef FUSEDMOE_WITH_CUDA
    cudaFree(data_);
#endif
  }
}

Buffer::Buffer(Buffer&& o) noexcept : data_(o.data_), bytes_(o.bytes_), device_(o.device_) {
  o.data_ = nullptr;
  o.bytes_ = 0;
}

Buffer& Buffer::operator=(Buffer&& o) noexcept {
  if (this != &o) {
    this->~Buffer();
    new (this) Buffer(std::move(o));
  }
  return *this;
}

Tensor Buffer::view(DType dtype, std::initializer_list<int64_t> shape) const {
  Tensor t = Tensor::contiguous(data_, dtype, shape, device_);
  if (t.nbytes() > bytes_)
    throw Error("Buffer::view: " + t.describe() + " needs " + std::to_string(t.nbytes()) + " bytes, buffer has " +
                std::to_string(bytes_));
  return t;
}

void copy_bytes(void* dst, const Device& dst_device, const void* src, const Device& src_device, size_t bytes) {
  if (bytes == 0) return;
  if (dst_device.type == DeviceType::cpu && src_device.type == DeviceType::cpu) {
    std::memcpy(dst, src, bytes);
    return;
  }
#ifdef FUSEDMOE_WITH_CUDA
  const cudaError_t err = cudaMemcpy(dst, src, bytes, cudaMemcpyDefault);
  if (err != cudaSuccess) throw Error(std::string("copy_bytes: cudaMemcpy failed: ") + cudaGetErrorString(err));
#else
  throw Error("copy_bytes: a CUDA device was named, but fusedmoe was built without CUDA");
#endif
}

}  // namespace fusedmoe
