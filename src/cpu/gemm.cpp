// Packed-panel GEMM in the BLIS style: A packed into MR-row panels, B into NR-column panels, an
// MR×NR register-tile micro-kernel written with GCC vector extensions (compiled twice: AVX2+FMA and
// baseline, picked at load time).
#include "gemm.hpp"

#include <algorithm>
#include <cstring>

#include "dtype_visit.hpp"
#include "parallel.hpp"

namespace fusedmoe::detail::cpu {

std::vector<int64_t> strided_offsets(int64_t n, int64_t stride) {
  std::vector<int64_t> v(static_cast<size_t>(std::max<int64_t>(n, 0)));
  for (int64_t i = 0; i < n; ++i) v[i] = i * stride;
  return v;
}

namespace {

constexpr int kMR = 6;
constexpr int kMaxPanel = 16;
constexpr int64_t kMC = 72, kNC = 256, kKC = 256;

template <class Acc> constexpr int kNR = 64 / sizeof(Acc);  // two 32-byte vectors: 16 floats, 8 doubles

template <class Acc>
[[gnu::always_inline]] inline void micro_body(int64_t kc, const Acc* __restrict pa, const Acc* __restrict pb,
                                              Acc* __restrict c, int64_t ldc) {
  typedef Acc V __attribute__((vector_size(32)));
  constexpr int L = 32 / sizeof(Acc);
  V acc[kMR][2];
  for (int r = 0; r < kMR; ++r) acc[r][0] = acc[r][1] = V{};
  for (int64_t k = 0; k < kc; ++k) {
    V b0, b1;
    std::memcpy(&b0, pb, sizeof(V));
    std::memcpy(&b1, pb + L, sizeof(V));
    for (int r = 0; r < kMR; ++r) {
      acc[r][0] += pa[r] * b0;
      acc[r][1] += pa[r] * b1;
    }
    pa += kMR;
    pb += 2 * L;
  }
  for (int r = 0; r < kMR; ++r) {
    for (int h = 0; h < 2; ++h) {
      V cur;
      std::memcpy(&cur, c + r * ldc + h * L, sizeof(V));
      cur += acc[r][h];
      std::memcpy(c + r * ldc + h * L, &cur, sizeof(V));
    }
  }
}

// Two builds of the micro-kernel: AVX2+FMA and the baseline ISA, chosen once by CPU features.
__attribute__((target("avx2,fma"))) void micro_f32_avx2(int64_t kc, const float* pa, const float* pb, float* c,
                                                         int64_t ldc) {
  micro_body<float>(kc, pa, pb, c, ldc);
}
__attribute__((target("avx2,fma"))) void micro_f64_avx2(int64_t kc, const double* pa, const double* pb, double* c,
                                                         int64_t ldc) {
  micro_body<double>(kc, pa, pb, c, ldc);
}
void micro_f32_base(int64_t kc, const float* pa, const float* pb, float* c, int64_t ldc) {
  micro_body<float>(kc, pa, pb, c, ldc);
}
void micro_f64_base(int64_t kc, const double* pa, const double* pb, double* c, int64_t ldc) {
  micro_body<double>(kc, pa, pb, c, ldc);
}
const bool kHaveAvx2Fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
inline void micro(int64_t kc, const float* pa, const float* pb, float* c, int64_t ldc) {
  kHaveAvx2Fma ? micro_f32_avx2(kc, pa, pb, c, ldc) : micro_f32_base(kc, pa, pb, c, ldc);
}
inline void micro(int64_t kc, const double* pa, const double* pb, double* c, int64_t ldc) {
  kHaveAvx2Fma ? micro_f64_avx2(kc, pa, pb, c, ldc) : micro_f64_base(kc, pa, pb, c, ldc);
}

template <class Acc>
inline Acc scale_of(const MatView& v, int64_t r, int64_t c) {
  Acc s = 1;
  if (v.row_scale) s *= static_cast<Acc>(v.row_scale[r]);
  if (v.col_scale) s *= static_cast<Acc>(v.col_scale[c]);
  return s;
}

// Packs panel rows [r0, r0+rows) × panel columns [c0, c0+cols) into panels of P rows:
// dst[(p·cols + c)·P + i] with panel row r = p·P + i. For A the panel rows are the MatView's rows; for B
// (kRowsAreVRows = false) they are its columns. Contiguous runs in either direction take a fast path.
template <class Acc, class S, bool kRowsAreVRows>
void pack(const MatView& v, int64_t r0, int64_t rows, int64_t c0, int64_t cols, int P, Acc* dst) {
  const S* base = static_cast<const S*>(v.base);
  const int64_t* roff = kRowsAreVRows ? v.row_off + r0 : v.col_off + r0;  // offset of panel row r
  const int64_t* coff = kRowsAreVRows ? v.col_off + c0 : v.row_off + c0;  // offset of panel column c
  auto unit = [](const int64_t* o, int64_t n) {
    for (int64_t i = 1; i < n; ++i)
      if (o[i] != o[0] + i) return false;
    return true;
  };
  const int64_t panels = (rows + P - 1) / P;
  const int64_t full_rows = rows;
  if (unit(coff, cols)) {  // each panel row is one contiguous run: stream the P rows side by side
    for (int64_t p = 0; p < panels; ++p) {
      Acc* out = dst + p * cols * P;
      const S* src[kMaxPanel];
      int live = 0;
      for (int i = 0; i < P; ++i) {
        const int64_t r = p * P + i;
        src[i] = r < full_rows ? base + roff[r] + coff[0] : nullptr;
        live += src[i] != nullptr;
      }
      if (live == P) {
        for (int64_t c = 0; c < cols; ++c)
          for (int i = 0; i < P; ++i) out[c * P + i] = static_cast<Acc>(num::Conv<S>::load(src[i][c]));
      } else {
        for (int64_t c = 0; c < cols; ++c)
          for (int i = 0; i < P; ++i) out[c * P + i] = src[i] ? static_cast<Acc>(num::Conv<S>::load(src[i][c])) : Acc(0);
      }
    }
  } else if (unit(roff, rows)) {  // each panel column is one contiguous run across panel rows
    for (int64_t p = 0; p < panels; ++p) {
      Acc* out = dst + p * cols * P;
      const int64_t valid = std::min<int64_t>(P, full_rows - p * P);
      for (int64_t c = 0; c < cols; ++c) {
        const S* src = base + roff[0] + p * P + coff[c];
        int i = 0;
        for (; i < valid; ++i) out[c * P + i] = static_cast<Acc>(num::Conv<S>::load(src[i]));
        for (; i < P; ++i) out[c * P + i] = 0;
      }
    }
  } else {
    for (int64_t p = 0; p < panels; ++p) {
      Acc* out = dst + p * cols * P;
      for (int i = 0; i < P; ++i) {
        const int64_t r = p * P + i;
        for (int64_t c = 0; c < cols; ++c)
          out[c * P + i] = r < full_rows ? static_cast<Acc>(num::Conv<S>::load(base[roff[r] + coff[c]])) : Acc(0);
      }
    }
  }
  if (!v.row_scale && !v.col_scale) return;
  for (int64_t p = 0; p < panels; ++p)
    for (int64_t c = 0; c < cols; ++c)
      for (int i = 0; i < P; ++i) {
        const int64_t r = p * P + i;
        if (r >= full_rows) continue;
        const int64_t vr = kRowsAreVRows ? r0 + r : c0 + c, vc = kRowsAreVRows ? c0 + c : r0 + r;
        dst[(p * cols + c) * P + i] *= scale_of<Acc>(v, vr, vc);
      }
}

template <class Acc>
struct Scratch {
  std::vector<Acc> pa, pb, c;
};

template <class Acc>
void pack_A(const MatView& A, int64_t m0, int64_t mc, int64_t k0, int64_t kc, Acc* dst) {
  visit_float(A.dtype, [&](auto tag) { pack<Acc, decltype(tag), true>(A, m0, mc, k0, kc, kMR, dst); });
}
template <class Acc>
void pack_B(const MatView& B, int64_t k0, int64_t kc, int64_t n0, int64_t nc, Acc* dst) {
  // Panel "rows" are B's columns n, panel "cols" are k.
  visit_float(B.dtype, [&](auto tag) { pack<Acc, decltype(tag), false>(B, n0, nc, k0, kc, kNR<Acc>, dst); });
}

template <class Acc>
void write_out(const OutView& C, int64_t m0, int64_t mc, int64_t n0, int64_t nc, const Acc* cbuf, int64_t ldc) {
  visit_float(C.dtype, [&](auto tag) {
    using S = decltype(tag);
    S* base = static_cast<S*>(C.base);
    for (int64_t m = 0; m < mc; ++m) {
      const int64_t ro = C.row_off[m0 + m];
      for (int64_t n = 0; n < nc; ++n) {
        const int64_t idx = ro + C.col_off[n0 + n];
        Acc v = cbuf[m * ldc + n];
        if (C.accumulate) v += static_cast<Acc>(num::load(base, idx));
        num::store(base, idx, v);
      }
    }
  });
}

template <class Acc>
void run_typed(const std::vector<MatmulJob>& jobs) {
  struct Task { size_t job; int64_t m0, n0; };
  std::vector<Task> tasks;
  for (size_t j = 0; j < jobs.size(); ++j) {
    const MatmulJob& jb = jobs[j];
    for (int64_t m0 = 0; m0 < jb.M; m0 += kMC)
      for (int64_t n0 = 0; n0 < jb.N; n0 += kNC) tasks.push_back({j, m0, n0});
  }
  constexpr int NR = kNR<Acc>;
  std::vector<Scratch<Acc>> scratch(static_cast<size_t>(num_threads()));
  parallel_for(static_cast<int64_t>(tasks.size()), [&](int64_t t, int worker) {
    const Task& task = tasks[t];
    const MatmulJob& jb = jobs[task.job];
    Scratch<Acc>& s = scratch[worker];
    if (s.c.empty()) {
      s.pa.resize(kMC * kKC);
      s.pb.resize(kKC * kNC);
      s.c.resize(kMC * kNC);
    }
    const int64_t mc = std::min(kMC, jb.M - task.m0), nc = std::min(kNC, jb.N - task.n0);
    const int64_t m_panels = (mc + kMR - 1) / kMR, n_panels = (nc + NR - 1) / NR;
    const int64_t ldc = n_panels * NR;
    std::fill(s.c.begin(), s.c.begin() + m_panels * kMR * ldc, Acc(0));
    for (int64_t k0 = 0; k0 < jb.K; k0 += kKC) {
      const int64_t kc = std::min(kKC, jb.K - k0);
      pack_A<Acc>(jb.A, task.m0, mc, k0, kc, s.pa.data());
      pack_B<Acc>(jb.B, k0, kc, task.n0, nc, s.pb.data());
      for (int64_t q = 0; q < n_panels; ++q)
        for (int64_t p = 0; p < m_panels; ++p)
          micro(kc, s.pa.data() + p * kc * kMR, s.pb.data() + q * kc * NR, s.c.data() + p * kMR * ldc + q * NR, ldc);
    }
    write_out<Acc>(jb.C, task.m0, mc, task.n0, nc, s.c.data(), ldc);
  });
}

}  // namespace

void run_matmuls(const std::vector<MatmulJob>& jobs, bool f64) {
  if (f64)
    run_typed<double>(jobs);
  else
    run_typed<float>(jobs);
}

}  // namespace fusedmoe::detail::cpu
