// Scalar conversions between storage dtypes and the float compute type, usable on host and device.
#pragma once

#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define FUSEDMOE_HD __host__ __device__ __forceinline__
#else
#define FUSEDMOE_HD inline
#endif

namespace fusedmoe::num {

// Storage-only 16-bit types: arithmetic always happens in float (or double).
struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

FUSEDMOE_HD float bits_to_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f; std::memcpy(&f, &u, 4); return f;
#endif
}
FUSEDMOE_HD uint32_t float_to_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u; std::memcpy(&u, &f, 4); return u;
#endif
}

FUSEDMOE_HD float bf16_to_float(uint16_t b) { return bits_to_float(static_cast<uint32_t>(b) << 16); }

// Round to nearest even; NaN stays a (quiet) NaN.
FUSEDMOE_HD uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

FUSEDMOE_HD float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return bits_to_float(sign);
  // Subnormal half: normalise.
  int e = -1;
  do { mant <<= 1; ++e; } while ((mant & 0x400u) == 0);
  return bits_to_float(sign | ((112u - e) << 23) | ((mant & 0x3ffu) << 13));
}

// Round to nearest even, with overflow to inf and gradual underflow.
FUSEDMOE_HD uint16_t float_to_f16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u;            // NaN
  if (a >= 0x477ff000u) return sign | 0x7c00u;           // rounds past 65504: inf
  if (a < 0x38800000u) {                                 // below the smallest normal half: subnormal
    if (a < 0x33000000u) return sign;                    // rounds to zero
    const uint32_t e = a >> 23;
    const uint32_t m = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - e;                     // 14..24
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return sign | static_cast<uint16_t>(r);
  }
  uint32_t r = a - 0x38000000u;                          // rebias exponent (127 -> 15)
  r += 0xfffu + ((r >> 13) & 1u);
  return sign | static_cast<uint16_t>(r >> 13);
}

template <class S> struct Conv;
template <> struct Conv<float> {
  FUSEDMOE_HD static float load(float v) { return v; }
  template <class A> FUSEDMOE_HD static float store(A v) { return static_cast<float>(v); }
};
template <> struct Conv<double> {
  FUSEDMOE_HD static double load(double v) { return v; }
  template <class A> FUSEDMOE_HD static double store(A v) { return static_cast<double>(v); }
};
template <> struct Conv<bf16_t> {
  FUSEDMOE_HD static float load(bf16_t v) { return bf16_to_float(v.bits); }
  template <class A> FUSEDMOE_HD static bf16_t store(A v) { return {float_to_bf16(static_cast<float>(v))}; }
};
template <> struct Conv<f16_t> {
  FUSEDMOE_HD static float load(f16_t v) { return f16_to_float(v.bits); }
  template <class A> FUSEDMOE_HD static f16_t store(A v) { return {float_to_f16(static_cast<float>(v))}; }
};

template <class S> FUSEDMOE_HD auto load(const S* p, int64_t i) { return Conv<S>::load(p[i]); }
template <class S, class A> FUSEDMOE_HD void store(S* p, int64_t i, A v) { p[i] = Conv<S>::store(v); }

// Unsigned division by a divisor fixed for a kernel (top-k, a tile count), exact for n < 2^31: q = (umulhi(n, m) + n) >> l with
// l = ceil(log2 d) and m = floor(2^32 (2^l - d) / d) + 1, the round-up magic number of Granlund and Montgomery
// (m + 2^32 = floor(2^(32+l) / d) + 1, exact for every 32-bit n; n < 2^31 keeps umulhi + n within 32 bits).
// Two instructions and a shift on the GPU against the ~20 of a division by a runtime value.
struct FastDivU31 {
  uint32_t m, l;
  FUSEDMOE_HD explicit FastDivU31(uint32_t d) : m(0), l(0) {
    while ((uint64_t{1} << l) < d) ++l;
    m = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << l) - d)) / d + 1);
  }
  FUSEDMOE_HD uint32_t operator()(uint32_t n) const {
#ifdef __CUDA_ARCH__
    const uint32_t hi = __umulhi(n, m);
#else
    const uint32_t hi = static_cast<uint32_t>((static_cast<uint64_t>(n) * m) >> 32);
#endif
    return (hi + n) >> l;
  }
};

}  // namespace fusedmoe::num
