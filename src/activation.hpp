// SiLU·mul and its derivative, shared by every backend so that all compute the same function.
#pragma once

#include <cmath>
#include <type_traits>

#include "numeric.hpp"

namespace fusedmoe::act {

template <class A> FUSEDMOE_HD A sigmoid(A g) {
#ifdef __CUDA_ARCH__
#ifndef FUSEDMOE_ACCURATE_SILU
  if constexpr (std::is_same_v<A, float>) {
    // On the GPU, float σ uses the hardware exp and a fast divide (about 1e-6 relative error, far below the
    // 16-bit outputs' rounding): the accurate expf and IEEE division took ~5× the instructions, and GEMM1's
    // epilogue evaluates 64 of them per thread per tile. (FUSEDMOE_ACCURATE_SILU builds the exact version.)
    // ex2 with denormals flushed: __expf's range fix-up for results below 2^-126 (three instructions) cannot
    // change 1 + e in float. A very negative g gives e = +inf and σ = 0 (__fdividef(1, inf) is 0), as before.
    float e;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(g * -1.4426950408889634f));
    return __fdividef(1.f, 1.f + e);
  }
#endif
  using ::exp;  // CUDA's float and double overloads
#else
  using std::exp;
#endif
  return A(1) / (A(1) + exp(-g));
}
template <class A> FUSEDMOE_HD A silu(A g) { return g * sigmoid(g); }

// d/dg [silu(g)·u] = u·σ(g)·(1 + g·(1 − σ(g)));  d/du = silu(g).
template <class A>
FUSEDMOE_HD void silu_mul_grad(A g, A u, A d, A& dg, A& du) {
  const A s = sigmoid(g);
  dg = d * u * s * (A(1) + g * (A(1) - s));
  du = d * g * s;
}

}  // namespace fusedmoe::act
