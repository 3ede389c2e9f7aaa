// Non-owning tensor views: the one currency of the C++ API.
//
// A `Tensor` describes memory the caller owns (a DLPack-like view: pointer, dtype, shape, strides in
// elements, device). fusedmoe never frees or resizes it. An undefined view (ndim == 0) marks an
// optional argument or an output that is not wanted.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>

namespace fusedmoe {

enum class DType : uint8_t { f32, f64, bf16, f16, i32, i64 };

enum class DeviceType : uint8_t { cpu, cuda };

struct Device {
  DeviceType type = DeviceType::cpu;
  int index = 0;
  bool operator==(const Device& o) const { return type == o.type && (type == DeviceType::cpu || index == o.index); }
  bool operator!=(const Device& o) const { return !(*this == o); }
  static Device cpu() { return {}; }
  static Device cuda(int index = 0) { return {DeviceType::cuda, index}; }
};

size_t dtype_size(DType dt);
const char* dtype_name(DType dt);
bool is_floating(DType dt);
std::string device_name(const Device& d);

constexpr int kMaxDims = 4;

struct Tensor {
  void* data = nullptr;
  DType dtype = DType::f32;
  Device device{};
  int ndim = 0;
  int64_t shape[kMaxDims] = {0, 0, 0, 0};
  int64_t strides[kMaxDims] = {0, 0, 0, 0};  // in elements, not bytes

  // A row-major contiguous view over `data`.
  static Tensor contiguous(void* data, DType dtype, std::initializer_list<int64_t> shape, Device device = {});

  bool defined() const { return ndim > 0; }
  int64_t numel() const;
  int64_t size(int dim) const { return shape[dim]; }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype); }
  bool is_contiguous() const;
  std::string describe() const;  // e.g. "bf16[4, 8] on cuda:0 (non-contiguous)"

  template <class T> T* ptr() const { return static_cast<T*>(data); }
};

// Caller-provided scratch memory on the device of the op's tensors.
struct Workspace {
  void* data = nullptr;
  size_t bytes = 0;
};

// The CUDA stream to run on (a cudaStream_t); ignored by the CPU backend. nullptr = legacy default stream.
struct Stream {
  void* handle = nullptr;
};

// An owning, untyped allocation on the CPU or a CUDA device, for programs and tests that do not bring
// their own allocator. Views are carved with `view`.
class Buffer {
 public:
  Buffer() = default;
  Buffer(size_t bytes, Device device);
  ~Buffer();
  Buffer(Buffer&& o) noexcept;
  Buffer& operator=(Buffer&& o) noexcept;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  const Device& device() const { return device_; }
  Tensor view(DType dtype, std::initializer_list<int64_t> shape) const;

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
  Device device_{};
};

// Copies `bytes` between host and device memory (either side may be CPU or CUDA); synchronous.
void copy_bytes(void* dst, const Device& dst_device, const void* src, const Device& src_device, size_t bytes);

// True when this build has the CUDA backend and a device of compute capability 9.0 is visible.
bool cuda_available();

// Hands the CUDA backend's cached scratch memory back to the driver. The backend keeps the pages of its
// stream-ordered scratch (the dX slot sums, the sort's block counts, split-K partials) between calls, as
// PyTorch's caching allocator does; memory still in use by queued work is kept until it is freed.
// A no-op without the CUDA backend.
void release_scratch_memory();

}  // namespace fusedmoe
