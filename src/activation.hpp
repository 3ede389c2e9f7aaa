// SiLU·mul and its derivative, shared by every backend so that all compute the same function.
#pragma once

#include <cmath>

#include "numeric.hpp"

namespace fusedmoe::act {

template <class A> FUSEDMOE_HD A sigmoid(A g) {
#ifdef __CUDA_ARCH__
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
