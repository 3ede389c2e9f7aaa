// Each op of the CPU backend against float64 loops written here, on fresh random inputs.
#include <algorithm>
#include <numeric>

#include "../../src/cluster_schedule.hpp"
#include "../../src/router_split.hpp"
#include "testing.hpp"

using namespace fmt;

namespace {

// Random top-k expert choices (distinct per token) and the routing metadata built naively.
struct Routed {
  int64_t T, E, k, M;
  HostTensor ids, gather, m_sizes, offsets;
  Routed(int64_t T_, int64_t E_, int64_t k_, int only_expert = -1) : T(T_), E(E_), k(k_), M(T_ * k_) {
    ids = HostTensor(DType::i32, {T, k});
    std::vector<int32_t> all(E);
    std::iota(all.begin(), all.end(), 0);
    for (int64_t t = 0; t < T; ++t) {
      std::shuffle(all.begin(), all.end(), rng());
      if (only_expert >= 0) std::swap(*std::find(all.begin(), all.end(), only_expert), all[0]);
      for (int64_t j = 0; j < k; ++j) ids.set(t * k + j, all[j]);
    }
    gather = HostTensor(DType::i32, {M});
    m_sizes = HostTensor(DType::i32, {E});
    offsets = HostTensor(DType::i32, {E + 1});
    int64_t row = 0;
    offsets.set(0, 0);
    for (int64_t e = 0; e < E; ++e) {
      int64_t n = 0;
      for (int64_t f = 0; f < M; ++f)
        if (ids.i32(f) == e) gather.set(row++, static_cast<double>(f)), ++n;
      m_sizes.set(e, static_cast<double>(n));
      offsets.set(e + 1, static_cast<double>(row));
    }
  }
  int64_t expert_of_row(int64_t i) const {
    int64_t e = 0;
    while (offsets.i32(e + 1) <= i) ++e;
    return e;
  }
  GroupedGemmArgs args(bool px, bool py) const { return {offsets.t, gather.t, static_cast<int>(k), px, py}; }
};

struct GemmCase { DType dtype; int64_t T, E, k, N, K; bool px, py; };

class GroupedGemmTest : public ::testing::TestWithParam<GemmCase> {};

TEST_P(GroupedGemmTest, ForwardDxDwMatchFloat64Loops) {
  const GemmCase c = GetParam();
  Routed r(c.T, c.E, c.k);
  const int64_t M = r.M, xr = c.px ? c.T : M;
  HostTensor X(c.dtype, {xr, c.K}), W(c.dtype, {c.E, c.N, c.K}), Y(c.dtype, {M, c.N});
  X.randn(); W.randn(1.0 / std::sqrt(double(c.K)));
  auto in_row = [&](int64_t i) { return c.px ? r.gather.i32(i) / c.k : i; };
  auto out_row = [&](int64_t i) { return c.py ? r.gather.i32(i) : i; };
  const auto x = X.values(), w = W.values();
  // forward
  Y.poison();
  grouped_gemm(X.t, W.t, r.args(c.px, c.py), Y.t);
  std::vector<double> ref(M * c.N, 0);
  for (int64_t i = 0; i < M; ++i) {
    const int64_t e = r.expert_of_row(i);
    for (int64_t n = 0; n < c.N; ++n) {
      double s = 0;
      for (int64_t kk = 0; kk < c.K; ++kk) s += x[in_row(i) * c.K + kk] * w[(e * c.N + n) * c.K + kk];
      ref[out_row(i) * c.N + n] = s;
    }
  }
  EXPECT_CLOSE(Y.values(), ref, tolerance(c.dtype));
  // dX (per routed row, and summed per token when permute_x)
  HostTensor dY(c.dtype, {M, c.N});
  dY.randn();
  const auto dy = dY.values();
  HostTensor dXs(c.dtype, {M, c.K});
  dXs.poison();
  grouped_gemm_dX(dY.t, W.t, r.args(c.px, c.py), dXs.t);
  std::vector<double> ref_dxs(M * c.K, 0), ref_dxt(c.T * c.K, 0);
  for (int64_t i = 0; i < M; ++i) {
    const int64_t e = r.expert_of_row(i);
    const int64_t dst = c.px ? r.gather.i32(i) : i;
    for (int64_t kk = 0; kk < c.K; ++kk) {
      double s = 0;
      for (int64_t n = 0; n < c.N; ++n) s += dy[out_row(i) * c.N + n] * w[(e * c.N + n) * c.K + kk];
      ref_dxs[dst * c.K + kk] = s;
      if (c.px) ref_dxt[(r.gather.i32(i) / c.k) * c.K + kk] += s;
    }
  }
  EXPECT_CLOSE(dXs.values(), ref_dxs, tolerance(c.dtype));
  if (c.px && c.k > 1) {
    HostTensor dXt(c.dtype, {c.T, c.K});
    dXt.poison();
    grouped_gemm_dX(dY.t, W.t, r.args(c.px, c.py), dXt.t);
    EXPECT_CLOSE(dXt.values(), ref_dxt, tolerance(c.dtype));
  }
  // dW (experts with no rows must come out as zeros)
  HostTensor dW(c.dtype, {c.E, c.N, c.K});
  dW.poison();
  grouped_gemm_dW(X.t, dY.t, r.args(c.px, c.py), dW.t);
  std::vector<double> ref_dw(c.E * c.N * c.K, 0);
  for (int64_t i = 0; i < M; ++i) {
    const int64_t e = r.expert_of_row(i);
    for (int64_t n = 0; n < c.N; ++n)
      for (int64_t kk = 0; kk < c.K; ++kk)
        ref_dw[(e * c.N + n) * c.K + kk] += dy[out_row(i) * c.N + n] * x[in_row(i) * c.K + kk];
  }
  EXPECT_CLOSE(dW.values(), ref_dw, tolerance(c.dtype));
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, GroupedGemmTest,
    ::testing::Values(GemmCase{DType::f32, 37, 5, 2, 70, 45, true, false},
                      GemmCase{DType::f32, 37, 5, 2, 70, 45, false, true},
                      GemmCase{DType::f32, 37, 5, 2, 70, 45, true, true},
                      GemmCase{DType::f32, 37, 5, 2, 70, 45, false, false},
                      GemmCase{DType::bf16, 64, 7, 3, 200, 300, true, true},
                      GemmCase{DType::f16, 33, 6, 6, 33, 100, true, false},
                      GemmCase{DType::f64, 9, 3, 1, 17, 29, true, true},
                      GemmCase{DType::bf16, 1, 16, 4, 96, 1000, true, false},     // T = 1, most experts empty
                      GemmCase{DType::f32, 150, 3, 3, 290, 270, false, true}));   // k = E, several tiles

TEST(GroupedGemm, RowWeightsScaleTheOutputSlot) {
  Routed r(20, 4, 2);
  HostTensor X(DType::f32, {20, 16}), W(DType::f32, {4, 8, 16}), Y(DType::f32, {40, 8}), Y0(DType::f32, {40, 8});
  HostTensor rw(DType::f32, {20, 2});
  X.randn(), W.randn(), rw.uniform(0.1, 1.0);
  grouped_gemm(X.t, W.t, r.args(true, true), Y0.t);
  grouped_gemm(X.t, W.t, r.args(true, true), Y.t, rw.t);
  std::vector<double> ref = Y0.values();
  for (int64_t f = 0; f < 40; ++f)
    for (int n = 0; n < 8; ++n) ref[f * 8 + n] *= rw.get(f);
  EXPECT_CLOSE(Y.values(), ref, 1e-6);
}

TEST(Router, LogitsMatchFloat64) {
  for (DType dt : {DType::f32, DType::bf16, DType::f16}) {
    const int64_t T = 45, H = 130, E = 11;
    HostTensor x(dt, {T, H}), gate(dt, {E, H}), logits(dt, {T, E});
    x.randn(), gate.randn(0.1), logits.poison();
    router_logits(x.t, gate.t, logits.t);
    std::vector<double> ref(T * E, 0);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t e = 0; e < E; ++e)
        for (int64_t h = 0; h < H; ++h) ref[t * E + e] += x.get(t * H + h) * gate.get(e * H + h);
    EXPECT_CLOSE(logits.values(), ref, tolerance(dt));
  }
}

TEST(Router, TopkSoftmaxRenormalise) {
  for (bool norm : {true, false})
    for (int k : {1, 3, 9}) {
      const int64_t T = 50, E = 9;
      HostTensor logits(DType::f32, {T, E}), w(DType::bf16, {T, k}), ids(DType::i32, {T, k});
      logits.randn(2.0), w.poison(), ids.poison();
      route_topk(logits.t, k, norm, w.t, ids.t);
      const auto p = ref_softmax(logits.values(), T, E);
      for (int64_t t = 0; t < T; ++t) {
        std::vector<int> order(E);
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return p[t * E + a] > p[t * E + b]; });
        double s = 0;
        for (int j = 0; j < k; ++j) s += p[t * E + order[j]];
        for (int j = 0; j < k; ++j) {
          EXPECT_EQ(ids.i32(t * k + j), order[j]) << "token " << t << " choice " << j;
          const double ref = p[t * E + order[j]] / (norm ? s : 1.0);
          EXPECT_NEAR(w.get(t * k + j), ref, 4e-3 * ref + 1e-6);
        }
      }
    }
}

TEST(Router, TiesPickTheLowerExpertAndNaNRanksFirst) {
  HostTensor logits(DType::f32, {2, 5}), w(DType::f32, {2, 2}), ids(DType::i32, {2, 2});
  for (int e = 0; e < 5; ++e) logits.set(e, 1.0);  // all tied
  for (int e = 0; e < 5; ++e) logits.set(5 + e, e);
  logits.set(5 + 2, NAN);
  route_topk(logits.t, 2, true, w.t, ids.t);
  EXPECT_EQ(ids.i32(0), 0);
  EXPECT_EQ(ids.i32(1), 1);
  EXPECT_NEAR(w.get(0), 0.5, 1e-7);
  EXPECT_EQ(ids.i32(2), 0);  // a NaN logit turns the row NaN: every expert ties as NaN, lower ids first
  EXPECT_TRUE(std::isnan(w.get(2)));
}

TEST(Router, SortByExpertIsStable) {
  for (int only : {-1, 2}) {
    Routed r(77, 6, only < 0 ? 3 : 1, only);
    HostTensor gather(DType::i32, {r.M}), m_sizes(DType::i32, {6}), offsets(DType::i32, {7});
    gather.poison(), m_sizes.poison(), offsets.poison();
    sort_by_expert(r.ids.t, 6, gather.t, m_sizes.t, offsets.t);
    EXPECT_EQ(gather.values(), r.gather.values());
    EXPECT_EQ(m_sizes.values(), r.m_sizes.values());
    EXPECT_EQ(offsets.values(), r.offsets.values());
    if (only >= 0) EXPECT_EQ(m_sizes.i32(only), 77);  // all tokens on one expert
  }
}

TEST(Elementwise, SiluMulForwardBackward) {
  for (DType dt : {DType::f32, DType::bf16}) {
    const int64_t M = 23, I = 37;
    HostTensor Y1(dt, {M, 2 * I}), A(dt, {M, I}), dA(dt, {M, I}), dY1(dt, {M, 2 * I});
    Y1.randn(2.0), dA.randn(), A.poison(), dY1.poison();
    silu_mul(Y1.t, A.t);
    silu_mul_backward(dA.t, Y1.t, dY1.t);
    std::vector<double> ra(M * I), rd(M * 2 * I);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t c = 0; c < I; ++c) {
        const double g = Y1.get(m * 2 * I + c), u = Y1.get(m * 2 * I + I + c), d = dA.get(m * I + c);
        const double s = sigmoid(g);
        ra[m * I + c] = g * s * u;
        rd[m * 2 * I + c] = d * u * s * (1 + g * (1 - s));
        rd[m * 2 * I + I + c] = d * g * s;
      }
    EXPECT_CLOSE(A.values(), ra, tolerance(dt));
    EXPECT_CLOSE(dY1.values(), rd, tolerance(dt));
  }
}

TEST(Elementwise, TopkCombineForwardBackward) {
  const int64_t T = 31, k = 4, H = 50;
  HostTensor Y2(DType::f32, {T * k, H}), w(DType::f32, {T, k}), out(DType::f32, {T, H}), dOut(DType::f32, {T, H});
  HostTensor dY2(DType::f32, {T * k, H}), dw(DType::f32, {T, k});
  Y2.randn(), w.uniform(0, 1), dOut.randn(), out.poison(), dY2.poison(), dw.poison();
  topk_combine(Y2.t, w.t, out.t);
  topk_combine_backward(dOut.t, Y2.t, w.t, dY2.t, dw.t);
  std::vector<double> ro(T * H, 0), rdy(T * k * H), rdw(T * k, 0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t f = t * k + j;
        ro[t * H + h] += w.get(f) * Y2.get(f * H + h);
        rdy[f * H + h] = w.get(f) * dOut.get(t * H + h);
        rdw[f] += dOut.get(t * H + h) * Y2.get(f * H + h);
      }
  EXPECT_CLOSE(out.values(), ro, 1e-6);
  EXPECT_CLOSE(dY2.values(), rdy, 1e-6);
  EXPECT_CLOSE(dw.values(), rdw, 1e-6);
}

// The router backward against central finite differences of the float64 forward.
TEST(Router, BackwardMatchesFiniteDifferences) {
  for (bool norm : {true, false}) {
    const int64_t T = 6, E = 7, k = 3;
    HostTensor logits(DType::f64, {T, E}), w(DType::f64, {T, k}), ids(DType::i32, {T, k});
    HostTensor dw(DType::f64, {T, k}), dlogits(DType::f64, {T, E});
    logits.randn(), dw.randn();
    route_topk(logits.t, k, norm, w.t, ids.t);
    route_topk_backward(logits.t, ids.t, dw.t, norm, dlogits.t);
    const double eps = 1e-6;
    std::vector<double> fd(T * E);
    for (int64_t i = 0; i < T * E; ++i) {
      const double v = logits.get(i);
      double lp = 0, lm = 0;
      for (int sgn : {1, -1}) {
        logits.set(i, v + sgn * eps);
        HostTensor w2(DType::f64, {T, k}), ids2(DType::i32, {T, k});
        route_topk(logits.t, k, norm, w2.t, ids2.t);
        ASSERT_EQ(ids2.values(), ids.values());
        double L = 0;
        for (int64_t f = 0; f < T * k; ++f) L += dw.get(f) * w2.get(f);
        (sgn > 0 ? lp : lm) = L;
      }
      logits.set(i, v);
      fd[i] = (lp - lm) / (2 * eps);
    }
    EXPECT_CLOSE(dlogits.values(), fd, 1e-6);
  }
}

TEST(Router, LogitsBackward) {
  const int64_t T = 19, H = 23, E = 5;
  HostTensor dl(DType::f32, {T, E}), x(DType::bf16, {T, H}), gate(DType::bf16, {E, H});
  HostTensor dx(DType::f32, {T, H}), dgate(DType::f32, {E, H});
  dl.randn(), x.randn(), gate.randn(), dx.randn(), dgate.poison();
  const auto dx0 = dx.values();
  router_logits_backward(dl.t, x.t, gate.t, dx.t, dgate.t, /*accumulate_dx=*/true);
  std::vector<double> rdx = dx0, rdg(E * H, 0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t e = 0; e < E; ++e)
      for (int64_t h = 0; h < H; ++h) {
        rdx[t * H + h] += dl.get(t * E + e) * gate.get(e * H + h);
        rdg[e * H + h] += dl.get(t * E + e) * x.get(t * H + h);
      }
  EXPECT_CLOSE(dx.values(), rdx, 1e-5);
  EXPECT_CLOSE(dgate.values(), rdg, 1e-5);
}

TEST(Numeric, Bf16AndF16RoundTrip) {
  for (float v : {0.0f, 1.0f, -2.5f, 3.14159f, 65504.0f, 1e-6f, -1e-8f, 6e-8f}) {
    EXPECT_NEAR(num::f16_to_float(num::float_to_f16(v)), v, std::abs(v) * 1e-3 + 6e-8) << v;
    EXPECT_NEAR(num::bf16_to_float(num::float_to_bf16(v)), v, std::abs(v) * 8e-3) << v;
  }
  EXPECT_TRUE(std::isinf(num::f16_to_float(num::float_to_f16(1e6f))));
  EXPECT_TRUE(std::isnan(num::bf16_to_float(num::float_to_bf16(NAN))));
  EXPECT_TRUE(std::isnan(num::f16_to_float(num::float_to_f16(NAN))));
  // Round to nearest even: 1 + 2^-8 lies halfway between two bf16 values and rounds down to 1.
  EXPECT_EQ(num::bf16_to_float(num::float_to_bf16(1.0f + 1.0f / 256)), 1.0f);
}

}  // namespace

// The dW kernel's divisions by a multiply and shift (slot -> token by top_k; tile index -> row tile and group by
// the tile counts), against the division: every top-k a config allows, larger divisors up to 2^31 - 1 (tile
// counts), and dividends across the whole int32 range.
TEST(Numeric, FastDivisionMatchesDivision) {
  std::mt19937 gen(7);
  std::vector<uint32_t> divisors;
  for (uint32_t d = 1; d <= 1024; ++d) divisors.push_back(d);  // top_k <= num_experts; <= 1024 groups (wgmma)
  for (uint32_t l = 11; l <= 31; ++l)
    for (uint32_t d : {(1u << l) - 1, 1u << l, (1u << l) + 1}) if (d < 0x80000000u) divisors.push_back(d);
  for (int i = 0; i < 200; ++i) divisors.push_back(1 + (gen() & 0x7ffffffeu));
  for (uint32_t d : divisors) {
    const num::FastDivU31 div(d);
    std::vector<uint32_t> ns = {0, 1, d - 1, d, d + 1, 2 * d - 1, 2 * d, 0x7fffffffu, 0x7ffffffeu, 0x7fffffffu - d};
    for (int i = 0; i < 2000; ++i) ns.push_back(gen() & 0x7fffffffu);
    for (uint32_t n : ns)
      if (n < 0x80000000u) ASSERT_EQ(div(n), n / d) << "n = " << n << ", d = " << d;  // (exact below 2^31)
  }
}

// The sm_90a GEMM's cluster schedule (src/cluster_schedule.hpp, the arithmetic its kernels run): for pairs and
// quads and every group shape up to 20 m-tiles × 12 n-tiles, the units cover each tile of the group exactly once;
// a multicast unit gives the cluster's CTAs neighbouring m-tiles of one n-tile (they share its weight tile); empty
// slots (n_tile past the last) are fewer than a unit's CTAs, and only in the group's last unit.
template <uint32_t kCluster>
void check_cluster_schedule() {
  for (uint32_t m_tiles = 0; m_tiles <= 20; ++m_tiles)
    for (uint32_t n_tiles = 1; n_tiles <= 12; ++n_tiles) {
      SCOPED_TRACE("cluster " + std::to_string(kCluster) + ", " + std::to_string(m_tiles) + " m-tiles × " +
                   std::to_string(n_tiles) + " n-tiles");
      std::vector<int> seen(m_tiles * n_tiles, 0);
      const uint32_t units = fusedmoe::detail::cluster_units(m_tiles, n_tiles, kCluster);
      uint32_t empty = 0;
      for (uint32_t u = 0; u < units; ++u) {
        fusedmoe::detail::ClusterTile t[kCluster];
        for (uint32_t r = 0; r < kCluster; ++r) t[r] = fusedmoe::detail::cluster_tile<kCluster>(u, m_tiles, n_tiles, r);
        for (uint32_t r = 0; r < kCluster; ++r) {
          ASSERT_EQ(t[r].multicast, t[0].multicast) << "unit " << u;
          if (t[0].multicast) {
            ASSERT_EQ(t[r].n_tile, t[0].n_tile) << "unit " << u;
            ASSERT_EQ(t[r].m_tile, t[0].m_tile + r) << "unit " << u;
            ASSERT_EQ(t[0].m_tile % kCluster, 0u) << "unit " << u;
          }
          if (t[r].n_tile >= n_tiles) {
            ++empty;
            ASSERT_EQ(u, units - 1) << "an empty tile before the group's last unit";
            continue;
          }
          ASSERT_LT(t[r].m_tile, m_tiles) << "unit " << u << ", rank " << r;
          ++seen[t[r].m_tile * n_tiles + t[r].n_tile];
        }
      }
      EXPECT_LT(empty, kCluster);
      for (uint32_t i = 0; i < seen.size(); ++i)
        ASSERT_EQ(seen[i], 1) << "tile (" << i / n_tiles << ", " << i % n_tiles << ")";
    }
}

TEST(Schedule, ClusterUnitsCoverEachTileOnce) {
  check_cluster_schedule<2>();
  check_cluster_schedule<4>();
}

// The CUDA router GEMM's split of H (src/router_split.hpp): at Qwen3-30B-A3B on an H200's and an H100's 132 SMs the
// choices NOTES (session 26) measured, then over a sweep of shapes, SM counts and rooms: every split is whole
// 64-column k-steps, at least 4 a slice, within one wave and the room, the largest such (up to 8), and 1 where
// the row tiles fill half the SMs.
TEST(Schedule, RouterSplitKeepsSlicesWholeAndFitsOneWave) {
  using fusedmoe::detail::router_split_k;
  constexpr size_t kAny = ~size_t{0};
  EXPECT_EQ(router_split_k(2048, 2048, 128, 132, kAny), 8);
  EXPECT_EQ(router_split_k(4096, 2048, 128, 132, kAny), 4);
  EXPECT_EQ(router_split_k(8448, 2048, 128, 132, kAny), 2);
  EXPECT_EQ(router_split_k(8449, 2048, 128, 132, kAny), 1);
  EXPECT_EQ(router_split_k(16384, 2048, 128, 132, kAny), 1);
  EXPECT_EQ(router_split_k(1, 2048, 128, 132, kAny), 8);
  EXPECT_EQ(router_split_k(2048, 2048, 128, 132, 4 * size_t{2048} * 128 * 4), 4);  // room for four slices' partials
  EXPECT_EQ(router_split_k(200, 1024, 256, 132, 200 * 1024 * 2), 2);  // the block case RouterSplitInRoom: not 4
  EXPECT_EQ(router_split_k(2048, 2048 + 8, 128, 132, kAny), 1);                  // H not whole k-steps
  EXPECT_EQ(router_split_k(0, 2048, 128, 132, kAny), 1);
  for (int64_t T : {1, 100, 128, 129, 700, 2048, 4101, 9000})
    for (int64_t H : {64, 256, 512, 768, 1000, 2048, 4096})
      for (int64_t E : {8, 128, 200, 256, 300})
        for (int sms : {16, 78, 132})
          for (size_t room : {size_t{0}, size_t{1} << 20, kAny}) {
            const int S = router_split_k(T, H, E, sms, room);
            const int64_t tiles = (T + 127) / 128 * (E >= 256 ? (E + 255) / 256 : (E + 127) / 128);
            auto fits = [&](int64_t s) {
              return H % 64 == 0 && (H / 64) % s == 0 && H / 64 / s >= 4 && tiles * s <= sms &&
                     static_cast<size_t>(s * T * E * 4) <= room;
            };
            SCOPED_TRACE("T=" + std::to_string(T) + " H=" + std::to_string(H) + " E=" + std::to_string(E) +
                         " sms=" + std::to_string(sms) + " room=" + std::to_string(room));
            ASSERT_GE(S, 1);
            ASSERT_LE(S, 8);
            if (2 * tiles > sms || H % 64 != 0) {
              ASSERT_EQ(S, 1);
              continue;
            }
            if (S > 1) ASSERT_TRUE(fits(S));
            for (int64_t larger = S + 1; larger <= 8; ++larger) ASSERT_FALSE(fits(larger)) << "S=" << larger << " fits";
          }
}
