// fusedmoe: the Qwen3-MoE MLP block, forward and backward, on Hopper GPUs and on the CPU.
#pragma once

#include "fusedmoe/block.hpp"
#include "fusedmoe/error.hpp"
#include "fusedmoe/ops.hpp"
#include "fusedmoe/tensor.hpp"
#include "fusedmoe/version.hpp"
