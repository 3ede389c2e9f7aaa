// Routes a backend op to the backend of the tensors' device.
#pragma once

#include "backend.hpp"
#include "fusedmoe/error.hpp"

namespace fusedmoe::detail {

#ifdef FUSEDMOE_WITH_CUDA
#define FUSEDMOE_DISPATCH(device, op, ...)                                                   \
  do {                                                                                       \
    if ((device).type == DeviceType::cuda) cuda::op(__VA_ARGS__); else cpu::op(__VA_ARGS__); \
  } while (0)
#else
#define FUSEDMOE_DISPATCH(device, op, ...)                                                           \
  do {                                                                                               \
    if ((device).type == DeviceType::cuda)                                                           \
      throw Error(std::string(#op) + ": tensors are on a CUDA device, but fusedmoe was built without CUDA"); \
    cpu::op(__VA_ARGS__);                                                                            \
  } while (0)
#endif

}  // namespace fusedmoe::detail
