// Calls fn with a value of the C++ storage type of a floating dtype.
#pragma once

#include "../numeric.hpp"
#include "fusedmoe/error.hpp"
#include "fusedmoe/tensor.hpp"

namespace fusedmoe::detail::cpu {

template <class Fn>
decltype(auto) visit_float(DType dt, Fn&& fn) {
  switch (dt) {
    case DType::f32: return fn(float{});
    case DType::f64: return fn(double{});
    case DType::bf16: return fn(num::bf16_t{});
    case DType::f16: return fn(num::f16_t{});
    default: throw Error(std::string("internal: expected a floating dtype, got ") + dtype_name(dt));
  }
}

// Reads element i of a floating tensor of any dtype as double (for small per-row arrays).
inline double load_as_double(const Tensor& t, int64_t i) {
  return visit_float(t.dtype, [&](auto tag) -> double {
    using S = decltype(tag);
    return static_cast<double>(num::load(static_cast<const S*>(t.data), i));
  });
}

template <class A>
inline void store_from(const Tensor& t, int64_t i, A v) {
  visit_float(t.dtype, [&](auto tag) {
    using S = decltype(tag);
    num::store(static_cast<S*>(t.data), i, v);
  });
}

// Elements [i, i + n) of a floating tensor converted to Acc, with one dtype dispatch for the span rather than one
// per element (the values are those of load_as_double cast to Acc: every storage type widens exactly).
template <class Acc>
inline void load_span(const Tensor& t, int64_t i, int64_t n, Acc* dst) {
  visit_float(t.dtype, [&](auto tag) {
    using S = decltype(tag);
    const S* src = static_cast<const S*>(t.data) + i;
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<Acc>(num::load(src, j));
  });
}

// Stores n values of Acc into elements [i, i + n) of a floating tensor (as store_from does, one dispatch per span).
template <class Acc>
inline void store_span(const Tensor& t, int64_t i, int64_t n, const Acc* src) {
  visit_float(t.dtype, [&](auto tag) {
    using S = decltype(tag);
    S* dst = static_cast<S*>(t.data) + i;
    for (int64_t j = 0; j < n; ++j) num::store(dst, j, src[j]);
  });
}

}  // namespace fusedmoe::detail::cpu
