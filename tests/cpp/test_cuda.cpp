// The CUDA backend against the CPU oracle and the float64 reference: every op, the whole block on the
// edge cases of DESIGN.md §5, poisoned outputs, determinism, CUDA-graph capture and 64-bit offsets.
// Every test skips itself where no Hopper GPU is visible.
#include <algorithm>
#include <numeric>
#include <thread>
#include <tuple>

#include "testing.hpp"

#ifdef FUSEDMOE_WITH_CUDA
#include <cuda_runtime.h>
#endif

using namespace fmt;

namespace {

#define REQUIRE_GPU() \
  if (!cuda_available()) GTEST_SKIP() << "no Hopper (sm_90) GPU visible"

const Device kGpu = Device::cuda(0);

// Random distinct expert choices per token, routed on the CPU (the oracle for the GPU sort).
struct Routing {
  HostTensor ids, gather, m_sizes, offsets;
  Routing(int64_t T, int E, int k, double hot_fraction = 0.0) {
    ids = HostTensor(DType::i32, {T, k});
    std::vector<int32_t> all(E);
    std::iota(all.begin(), all.end(), 0);
    std::uniform_real_distribution<double> u(0, 1);
    for (int64_t t = 0; t < T; ++t) {
      std::shuffle(all.begin(), all.end(), rng());
      if (u(rng()) < hot_fraction) std::swap(*std::find(all.begin(), all.end(), 0), all[0]);  // skew to expert 0
      for (int j = 0; j < k; ++j) ids.set(t * k + j, all[j]);
    }
    sort(E);
  }
  // Top-1 routing in which expert e receives exactly group_sizes[e] tokens, in shuffled token order.
  explicit Routing(const std::vector<int>& group_sizes) {
    std::vector<int32_t> experts;
    for (size_t e = 0; e < group_sizes.size(); ++e) experts.insert(experts.end(), group_sizes[e], static_cast<int32_t>(e));
    std::shuffle(experts.begin(), experts.end(), rng());
    ids = HostTensor(DType::i32, {static_cast<int64_t>(experts.size()), 1});
    for (size_t t = 0; t < experts.size(); ++t) ids.set(static_cast<int64_t>(t), experts[t]);
    sort(static_cast<int>(group_sizes.size()));
  }

 private:
  void sort(int E) {
    gather = HostTensor(DType::i32, {ids.t.numel()});
    m_sizes = HostTensor(DType::i32, {E});
    offsets = HostTensor(DType::i32, {E + 1});
    sort_by_expert(ids.t, E, gather.t, m_sizes.t, offsets.t);
  }
};

TEST(CudaOps, SortByExpertMatchesCpuExactly) {
  REQUIRE_GPU();
  // Up to 4096 slots and 256 experts one block sorts; beyond either, three kernels over the GPU (both at their
  // edges: 4096 and 4104 slots, 256 and 300 experts).
  for (auto [T, E, k, hot] : {std::tuple{1, 8, 2, 0.0}, std::tuple{3000, 128, 8, 0.0}, std::tuple{777, 10, 10, 0.0},
                              std::tuple{5000, 6, 1, 1.0}, std::tuple{4096, 64, 4, 0.7}, std::tuple{512, 128, 8, 0.0},
                              std::tuple{513, 128, 8, 0.3}, std::tuple{300, 256, 8, 0.0}, std::tuple{100, 300, 4, 0.0}}) {
    Routing r(T, E, k, hot);
    DeviceCopy ids(r.ids, kGpu), gather(r.gather, kGpu, false), ms(r.m_sizes, kGpu, false), offs(r.offsets, kGpu, false);
    sort_by_expert(ids.t, E, gather.t, ms.t, offs.t);
    EXPECT_EQ(gather.download().values(), r.gather.values()) << "T=" << T << " E=" << E;
    EXPECT_EQ(ms.download().values(), r.m_sizes.values());
    EXPECT_EQ(offs.download().values(), r.offsets.values());
  }
}

// The router's logits: the tensor-core GEMM for 16-byte rows (one m-tile and several), the portable one for others.
// Where the row tiles leave most SMs idle and H is whole k-steps, H is split into slices (the split-K path): here
// into 8 (T=2048 and T=1 at H=2048), 4 (T=4101, and 1000 at H=1024), 3 (two column tiles, one partial) and 2 (E = 256).
TEST(CudaOps, RouterLogitsMatchCpu) {
  REQUIRE_GPU();
  for (auto [T, E, H] : {std::tuple<int64_t, int64_t, int64_t>{1, 128, 2048}, {7, 7, 64}, {512, 128, 256},
                         {513, 40, 128}, {100, 300, 40}, {33, 16, 61}, {2048, 128, 2048}, {4101, 128, 2048},
                         {1000, 64, 1024}, {257, 200, 768}, {300, 256, 512}}) {
    HostTensor x(DType::bf16, {T, H}), gate(DType::bf16, {E, H}), logits(DType::bf16, {T, E});
    x.randn(), gate.randn();
    router_logits(x.t, gate.t, logits.t);
    DeviceCopy gx(x, kGpu), gg(gate, kGpu), gl(logits, kGpu, false);
    router_logits(gx.t, gg.t, gl.t);
    EXPECT_CLOSE(gl.download().values(), logits.values(), 1e-2) << "T=" << T << " E=" << E << " H=" << H;
  }
}

// The top-k combine with 16-byte column groups and single elements, and slot counts that are no multiple of the
// kernel's unrolling by 4 (k = 10, 3).
TEST(CudaOps, TopkCombineMatchesCpu) {
  REQUIRE_GPU();
  for (auto [T, k, H] : {std::tuple<int64_t, int64_t, int64_t>{1, 8, 2048}, {37, 10, 256}, {300, 8, 72}, {5, 3, 90}}) {
    HostTensor Y2(DType::bf16, {T * k, H}), w(DType::bf16, {T, k}), out(DType::bf16, {T, H});
    Y2.randn(), w.uniform(0, 1);
    topk_combine(Y2.t, w.t, out.t);
    DeviceCopy gY2(Y2, kGpu), gw(w, kGpu), gout(out, kGpu, false);
    topk_combine(gY2.t, gw.t, gout.t);
    EXPECT_CLOSE(gout.download().values(), out.values(), 1e-2) << "T=" << T << " k=" << k << " H=" << H;
  }
}

TEST(CudaOps, RouteTopkMatchesCpu) {
  REQUIRE_GPU();
  // k above 32 takes the kernel's selections in several rounds of a warp's lanes. E picks the kernel: up to 256
  // experts the keys sit in registers (1, 2, 4 or 8 per lane), beyond that a shared-memory scan. bf16 logits tie
  // often, which exercises the lower-id-first order; two rows hold a NaN (the whole row ranks as NaN: ids 0…k-1).
  for (bool norm : {true, false})
    for (auto [E, k] : {std::pair{40, 1}, std::pair{40, 8}, std::pair{40, 33}, std::pair{40, 40}, std::pair{128, 70},
                        std::pair{16, 4}, std::pair{64, 8}, std::pair{200, 8}, std::pair{256, 40}, std::pair{300, 8}}) {
      const int64_t T = 999;
      HostTensor logits(DType::bf16, {T, E}), w(DType::bf16, {T, k}), ids(DType::i32, {T, k});
      logits.randn(2.0);
      for (int64_t t : {int64_t{5}, T - 1}) logits.set(t * E + (t % E), std::nan(""));
      route_topk(logits.t, k, norm, w.t, ids.t);
      DeviceCopy dl(logits, kGpu), dw(w, kGpu, false), di(ids, kGpu, false);
      route_topk(dl.t, k, norm, dw.t, di.t);
      EXPECT_EQ(di.download().values(), ids.values()) << "E " << E << " k " << k;
      for (int64_t t : {int64_t{5}, T - 1})
        for (int j = 0; j < k; ++j) {
          EXPECT_EQ(ids.i32(t * k + j), j) << "NaN row " << t;
          w.set(t * k + j, 0.0);  // NaN weights on both sides: compared as zeros
        }
      std::vector<double> got = dw.download().values();
      for (int64_t t : {int64_t{5}, T - 1})
        for (int j = 0; j < k; ++j) {
          EXPECT_TRUE(std::isnan(got[t * k + j])) << "NaN row " << t;
          got[t * k + j] = 0.0;
        }
      EXPECT_CLOSE(got, w.values(), 1e-2);
    }
}

// The router backward's kernels: the softmax in registers (E up to 256, k up to 32) and the shared-memory one (E or k
// beyond), against the CPU's, at the forward's own selections.
TEST(CudaOps, RouteTopkBackwardMatchesCpu) {
  REQUIRE_GPU();
  for (bool norm : {true, false})
    for (auto [E, k] : {std::pair{40, 8}, std::pair{40, 33}, std::pair{128, 8}, std::pair{16, 4}, std::pair{256, 32},
                        std::pair{300, 8}}) {
      const int64_t T = 777;
      HostTensor logits(DType::bf16, {T, E}), w(DType::bf16, {T, k}), ids(DType::i32, {T, k});
      HostTensor dw(DType::bf16, {T, k}), dlogits(DType::f32, {T, E});
      logits.randn(2.0), dw.randn();
      route_topk(logits.t, k, norm, w.t, ids.t);
      route_topk_backward(logits.t, ids.t, dw.t, norm, dlogits.t);
      DeviceCopy gl(logits, kGpu), gi(ids, kGpu), gdw(dw, kGpu), gdl(dlogits, kGpu, false);
      route_topk_backward(gl.t, gi.t, gdw.t, norm, gdl.t);
      EXPECT_CLOSE(gdl.download().values(), dlogits.values(), 1e-4) << "E " << E << " k " << k << " norm " << norm;
    }
}

struct GemmCase { DType dtype; int64_t T; int E, k; int64_t N, K; bool px, py; double hot; };

class CudaGroupedGemm : public ::testing::TestWithParam<GemmCase> {};

TEST_P(CudaGroupedGemm, ForwardDxDwMatchCpu) {
  REQUIRE_GPU();
  const GemmCase c = GetParam();
  Routing r(c.T, c.E, c.k, c.hot);
  const int64_t M = c.T * c.k;
  HostTensor X(c.dtype, {c.px ? c.T : M, c.K}), W(c.dtype, {c.E, c.N, c.K}), Y(c.dtype, {M, c.N});
  HostTensor dY(c.dtype, {M, c.N}), dXs(c.dtype, {M, c.K}), dXt(c.dtype, {c.T, c.K}), dW(c.dtype, {c.E, c.N, c.K});
  X.randn(), W.randn(1.0 / std::sqrt(double(c.K))), dY.randn();
  const GroupedGemmArgs a{r.offsets.t, r.gather.t, c.k, c.px, c.py};
  grouped_gemm(X.t, W.t, a, Y.t);
  grouped_gemm_dX(dY.t, W.t, a, dXs.t);
  if (c.px) grouped_gemm_dX(dY.t, W.t, a, dXt.t);
  grouped_gemm_dW(X.t, dY.t, a, dW.t);

  DeviceCopy gX(X, kGpu), gW(W, kGpu), gdY(dY, kGpu), go(r.offsets, kGpu), gg(r.gather, kGpu);
  DeviceCopy gY(Y, kGpu, false), gdXs(dXs, kGpu, false), gdXt(dXt, kGpu, false), gdW(dW, kGpu, false);
  const GroupedGemmArgs ga{go.t, gg.t, c.k, c.px, c.py};
  grouped_gemm(gX.t, gW.t, ga, gY.t);
  grouped_gemm_dX(gdY.t, gW.t, ga, gdXs.t);
  if (c.px) grouped_gemm_dX(gdY.t, gW.t, ga, gdXt.t);
  grouped_gemm_dW(gX.t, gdY.t, ga, gdW.t);
  const double tol = 1e-2;
  EXPECT_CLOSE(gY.download().values(), Y.values(), tol);
  EXPECT_CLOSE(gdXs.download().values(), dXs.values(), tol);
  if (c.px) EXPECT_CLOSE(gdXt.download().values(), dXt.values(), tol);
  EXPECT_CLOSE(gdW.download().values(), dW.values(), tol);
}

// dW reduces over each expert's rows in k-steps of 64 and skips the k16 slices of its last k-step that lie wholly
// past the expert's end: group sizes on both sides of every 16-row boundary of a k-step (and empty groups), in
// each operand layout (gathered X or dY, read in expert order or by TMA).
TEST(CudaGroupedGemmDw, EveryTailSliceCountMatchesCpu) {
  REQUIRE_GPU();
  const std::vector<int> sizes = {1, 15, 16, 17, 0, 31, 32, 33, 47, 48, 49, 63, 64, 65, 0, 79, 80, 81, 127, 128, 129, 200};
  const int E = static_cast<int>(sizes.size());
  const int64_t N = 256, K = 192;
  for (const auto& [px, py] : {std::pair{true, false}, std::pair{false, true}, std::pair{false, false}}) {
    Routing r(sizes);
    const int64_t M = r.gather.t.numel();
    HostTensor X(DType::bf16, {M, K}), dY(DType::bf16, {M, N}), dW(DType::bf16, {E, N, K});
    X.randn(), dY.randn();
    const GroupedGemmArgs a{r.offsets.t, r.gather.t, 1, px, py};
    grouped_gemm_dW(X.t, dY.t, a, dW.t);
    DeviceCopy gX(X, kGpu), gdY(dY, kGpu), go(r.offsets, kGpu), gg(r.gather, kGpu), gdW(dW, kGpu, false);
    grouped_gemm_dW(gX.t, gdY.t, GroupedGemmArgs{go.t, gg.t, 1, px, py}, gdW.t);
    // Expert by expert: one skipped row of real data moves its own expert's error far past the tolerance.
    const std::vector<double> got = gdW.download().values(), want = dW.values();
    for (int e = 0; e < E; ++e) {
      const auto at = [&](const std::vector<double>& v) {
        return std::vector<double>(v.begin() + e * N * K, v.begin() + (e + 1) * N * K);
      };
      EXPECT_CLOSE(at(got), at(want), 1e-2) << "expert " << e << " of " << sizes[e] << " rows, permute_x " << px
                                            << " permute_y " << py;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CudaGroupedGemm,
    ::testing::Values(GemmCase{DType::bf16, 300, 8, 2, 256, 512, true, false, 0.0},
                      GemmCase{DType::bf16, 300, 8, 2, 256, 512, false, true, 0.0},
                      GemmCase{DType::bf16, 300, 8, 2, 256, 512, false, false, 0.0},
                      GemmCase{DType::f16, 257, 5, 3, 200, 136, true, true, 0.0},
                      GemmCase{DType::bf16, 1, 16, 4, 96, 1000, true, false, 0.0},     // T = 1
                      GemmCase{DType::bf16, 123, 7, 2, 61, 45, true, true, 0.0},       // unaligned rows
                      GemmCase{DType::bf16, 2000, 16, 4, 384, 256, true, true, 0.8},   // skewed
                      GemmCase{DType::bf16, 64, 4, 4, 128, 128, true, false, 0.0}));  // k = E

TEST(CudaOps, ElementwiseMatchCpu) {
  REQUIRE_GPU();
  const int64_t T = 123, k = 3, M = T * k, I = 77, H = 90;
  HostTensor Y1(DType::bf16, {M, 2 * I}), A(DType::bf16, {M, I}), dA(DType::bf16, {M, I}), dY1(DType::bf16, {M, 2 * I});
  HostTensor Y2(DType::bf16, {M, H}), w(DType::bf16, {T, k}), out(DType::bf16, {T, H}), dOut(DType::bf16, {T, H});
  HostTensor dY2(DType::bf16, {M, H}), dw(DType::f32, {T, k});
  Y1.randn(2), dA.randn(), Y2.randn(), w.uniform(0, 1), dOut.randn();
  silu_mul(Y1.t, A.t);
  silu_mul_backward(dA.t, Y1.t, dY1.t);
  topk_combine(Y2.t, w.t, out.t);
  topk_combine_backward(dOut.t, Y2.t, w.t, dY2.t, dw.t);
  DeviceCopy gY1(Y1, kGpu), gdA(dA, kGpu), gY2(Y2, kGpu), gw(w, kGpu), gdOut(dOut, kGpu);
  DeviceCopy gA(A, kGpu, false), gdY1(dY1, kGpu, false), gout(out, kGpu, false), gdY2(dY2, kGpu, false),
      gdw(dw, kGpu, false);
  silu_mul(gY1.t, gA.t);
  silu_mul_backward(gdA.t, gY1.t, gdY1.t);
  topk_combine(gY2.t, gw.t, gout.t);
  topk_combine_backward(gdOut.t, gY2.t, gw.t, gdY2.t, gdw.t);
  EXPECT_CLOSE(gA.download().values(), A.values(), 1e-2);
  EXPECT_CLOSE(gdY1.download().values(), dY1.values(), 1e-2);
  EXPECT_CLOSE(gout.download().values(), out.values(), 1e-2);
  EXPECT_CLOSE(gdY2.download().values(), dY2.values(), 1e-2);
  EXPECT_CLOSE(gdw.download().values(), dw.values(), 1e-4);
}

// Long router reductions are split into row chunks (dgate: one group over every token) and re-summed in
// chunk order; checked against the CPU on shapes that take the split and the plain path.
TEST(CudaOps, RouterBackwardMatchesCpu) {
  REQUIRE_GPU();
  for (auto [T, E, H] : {std::tuple<int64_t, int64_t, int64_t>{4099, 16, 64}, {70000, 128, 256}, {300, 24, 40}}) {
    HostTensor dl(DType::f32, {T, E}), x(DType::bf16, {T, H}), gate(DType::bf16, {E, H});
    HostTensor dx(DType::bf16, {T, H}), dgate(DType::bf16, {E, H});
    dl.randn(), x.randn(), gate.randn(), dx.randn();
    DeviceCopy gdl(dl, kGpu), gx(x, kGpu), ggate(gate, kGpu), gdx(dx, kGpu), gdgate(dgate, kGpu, false);
    router_logits_backward(dl.t, x.t, gate.t, dx.t, dgate.t, /*accumulate_dx=*/true);
    router_logits_backward(gdl.t, gx.t, ggate.t, gdx.t, gdgate.t, /*accumulate_dx=*/true);
    EXPECT_CLOSE(gdgate.download().values(), dgate.values(), 1e-2) << "T=" << T;
    EXPECT_CLOSE(gdx.download().values(), dx.values(), 1e-2) << "T=" << T;
  }
}

class CudaBlock : public ::testing::TestWithParam<BlockCase> {};

TEST_P(CudaBlock, ForwardAndBackwardMatchFloat64Reference) {
  REQUIRE_GPU();
  const BlockCase c = GetParam();
  BlockTensors b(MoeConfig{c.H, c.I, c.E, c.k, c.norm, c.dtype}, c.T);
  if (c.one_expert) steer_to_expert_zero(b);
  const HostTensor dout = random_dout(b);
  const BlockResult res = run_block(b, dout, kGpu);
  expect_block_matches_reference(b, dout, res);
}

INSTANTIATE_TEST_SUITE_P(EdgeCases, CudaBlock, ::testing::ValuesIn(edge_cases(/*with_wide_dtypes=*/false)),
                         [](const auto& info) { return std::string(info.param.name); });

// Every kernel choice computes the same block (against the float64 reference), and a wgmma request the
// problem cannot meet is an error rather than a silent fallback.
TEST(CudaBlock, EveryKernelChoiceMatchesReference) {
  REQUIRE_GPU();  // (an sm_90 GPU: every choice can run)
  using K = GemmKernel;
  const std::vector<GemmTiling> nt_nn = {
      {K::portable, 128, 1}, {K::wgmma, 128, 1}, {K::wgmma, 128, 2}, {K::wgmma, 256, 1}, {K::wgmma, 256, 2}};
  const std::vector<GemmTiling> tn = {{K::portable, 128, 1}, {K::wgmma, 128, 1}, {K::wgmma, 256, 1}};
  for (size_t i = 0; i < nt_nn.size(); ++i) {
    // 250 rows per expert: two m-tiles, so CTA pairs see full, partial and (past a group's end) empty tiles.
    MoeConfig cfg{256, 192, 8, 2, true, DType::bf16};
    cfg.kernels = {nt_nn[i], nt_nn[(i + 2) % nt_nn.size()], tn[i % tn.size()]};
    SCOPED_TRACE("choice " + std::to_string(i));
    BlockTensors b(cfg, 1000);
    const HostTensor dout = random_dout(b);
    expect_block_matches_reference(b, dout, run_block(b, dout, kGpu));
  }
  // Rows of 61 elements are not 16-byte multiples: the wgmma kernel cannot take them.
  MoeConfig odd{61, 27, 7, 3, true, DType::bf16};
  odd.kernels.forward.kernel = K::wgmma;
  BlockTensors b(odd, 21);
  const HostTensor dout = random_dout(b);
  try {
    run_block(b, dout, kGpu);
    ADD_FAILURE() << "expected fusedmoe::Error for a wgmma request on unaligned rows";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("wgmma"), std::string::npos) << e.what();
  }
}

// Intermediate sizes of 256 and more (the 256-wide tiles of every nt/nn GEMM) that are no multiple of the tile
// or of 128, fp16 too, with and without renormalised routing weights.
// Inference forward (no Y1): the wgmma GEMM1 skips Y1's stores; the portable one computes Y1 into scratch for
// its separate SiLU·mul pass. Both give the training forward's output bitwise.
TEST(CudaBlock, InferenceForwardKeepsNoGateUpAndMatches) {
  REQUIRE_GPU();
  MoeConfig cfg{256, 192, 8, 2, true, DType::bf16};
  expect_inference_forward_matches(cfg, 1000, kGpu);
  cfg.kernels.forward.kernel = GemmKernel::portable;
  expect_inference_forward_matches(cfg, 1000, kGpu);
  expect_inference_forward_matches(MoeConfig{61, 27, 7, 3, true, DType::bf16}, 21, kGpu);  // unaligned rows
}

// Enough tokens that the router's dgate reduction is split into row chunks: their partial sums come from the
// backward workspace, over the experts' scratch.
TEST(CudaBlock, RouterSplitReductionInTheWorkspaceMatchesReference) {
  REQUIRE_GPU();
  BlockTensors b(MoeConfig{256, 128, 8, 2, true, DType::bf16}, 2100);
  const HostTensor dout = random_dout(b);
  expect_block_matches_reference(b, dout, run_block(b, dout, kGpu));
}

TEST(CudaBlock, WideIntermediateMatchesReference) {
  REQUIRE_GPU();
  for (const auto& [dtype, I, norm] : {std::tuple{DType::bf16, 320, true}, std::tuple{DType::f16, 256, false},
                                       std::tuple{DType::bf16, 776, true}}) {
    SCOPED_TRACE("I=" + std::to_string(I));
    BlockTensors b(MoeConfig{256, I, 8, 3, norm, dtype}, 301);
    const HostTensor dout = random_dout(b);
    expect_block_matches_reference(b, dout, run_block(b, dout, kGpu));
  }
}

// The backward from a thread that has made no CUDA call yet (as the autograd engine's backward thread
// may be): the TMA descriptor encoding (a driver call) must find a context there.
// A small block's eager GPU result, and its tensors on the GPU for a second run in some other way whose
// results must be bitwise the same.
struct SecondRun {
  BlockTensors b;
  HostTensor dout;
  BlockResult eager;
  DeviceBlock d;
  SecondRun(const MoeConfig& c, int64_t T)
      : b(c, T), dout(random_dout(b)), eager(run_block(b, dout, kGpu)), d(b, dout, kGpu) {}
  void expect_same_as_eager(const std::string& what) {
    EXPECT_TRUE(d.out.download().bitwise_equal(eager.out)) << what;
    EXPECT_TRUE(d.dx.download().bitwise_equal(eager.dx)) << what;
    EXPECT_TRUE(d.dgate.download().bitwise_equal(eager.dgate)) << what;
    EXPECT_TRUE(d.dw1.download().bitwise_equal(eager.dw1)) << what;
    EXPECT_TRUE(d.dw2.download().bitwise_equal(eager.dw2)) << what;
  }
};

TEST(CudaBlock, BackwardFromAFreshThread) {
  REQUIRE_GPU();
  SecondRun run(MoeConfig{256, 128, 8, 2, true, DType::bf16}, 300);
  run.d.forward();
  std::string error;
  std::thread([&] {
    try {
      run.d.backward();
    } catch (const Error& e) {
      error = e.what();
    }
  }).join();
  ASSERT_EQ(error, "");
  run.expect_same_as_eager("backward from a fresh thread");
}

// The backend's scratch pool keeps its pages between calls; handing them back (with work still queued that
// allocates more) must not change a result.
TEST(CudaBlock, ScratchMemoryReleaseKeepsResults) {
  REQUIRE_GPU();
  SecondRun run(MoeConfig{256, 128, 12, 3, true, DType::bf16}, 333);
  release_scratch_memory();
  run.d.forward();
  release_scratch_memory();
  run.d.backward();
  release_scratch_memory();
  run.expect_same_as_eager("after release_scratch_memory()");
}

TEST(CudaBlock, DeterministicBitwise) {
  REQUIRE_GPU();
  BlockTensors b(MoeConfig{512, 256, 16, 4, true, DType::bf16}, 700);
  const HostTensor dout = random_dout(b);
  const BlockResult r1 = run_block(b, dout, kGpu), r2 = run_block(b, dout, kGpu);
  for (auto [x, y] : {std::pair{&r1.out, &r2.out}, std::pair{&r1.dx, &r2.dx}, std::pair{&r1.dgate, &r2.dgate},
                      std::pair{&r1.dw1, &r2.dw1}, std::pair{&r1.dw2, &r2.dw2}})
    EXPECT_TRUE(x->bitwise_equal(*y));
}

TEST(CudaBlock, QwenShapeMatchesCpuOracle) {
  REQUIRE_GPU();
  // Qwen3-30B-A3B expert shapes at a few hundred tokens: the GPU against the CPU backend.
  BlockTensors b(qwen3_30b_a3b_config(), 256);
  const HostTensor dout = random_dout(b);
  const BlockResult gpu = run_block(b, dout, kGpu);
  // Same routing on both sides is required for a fair comparison: near-ties may differ, so count them.
  const BlockResult cpu = run_block(b, dout, Device::cpu());
  size_t same = 0;
  for (size_t i = 0; i < gpu.ids().size(); ++i) same += gpu.ids()[i] == cpu.ids()[i];
  ASSERT_GE(same, gpu.ids().size() * 99 / 100) << "routing decisions differ too often";
  if (same == gpu.ids().size()) {
    EXPECT_CLOSE(gpu.out.values(), cpu.out.values(), 1e-2);
    EXPECT_CLOSE(gpu.dx.values(), cpu.dx.values(), 1e-2);
    EXPECT_CLOSE(gpu.dw1.values(), cpu.dw1.values(), 1e-2);
    EXPECT_CLOSE(gpu.dw2.values(), cpu.dw2.values(), 1e-2);
  }
}

#ifdef FUSEDMOE_WITH_CUDA
// The block's routing either in one cooperative launch (E = 64, k = 8, 4800 slots) or in separate kernels (k = 3).
struct CaptureCase {
  const char* name;
  MoeConfig cfg;
};
void PrintTo(const CaptureCase& c, std::ostream* os) { *os << c.name; }
class CudaGraphCapture : public ::testing::TestWithParam<CaptureCase> {};
INSTANTIATE_TEST_SUITE_P(Routing, CudaGraphCapture,
                         ::testing::Values(CaptureCase{"SeparateKernels", MoeConfig{256, 128, 12, 3, true, DType::bf16}},
                                           CaptureCase{"OneLaunch", MoeConfig{256, 128, 64, 8, true, DType::bf16}}),
                         [](const auto& info) { return std::string(info.param.name); });

TEST_P(CudaGraphCapture, ReplaysIdentically) {
  REQUIRE_GPU();
  SecondRun run(GetParam().cfg, 600);
  DeviceBlock& d = run.d;
  cudaStream_t stream;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  // Warm once outside capture (one-time kernel attribute setup), then capture forward + backward.
  d.forward({stream});
  d.backward({stream});
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  for (const Tensor* t : {&d.out.t, &d.dx.t, &d.dw1.t}) poison_bytes(t->data, t->nbytes(), kGpu);
  cudaGraph_t graph;
  ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), cudaSuccess);
  d.forward({stream});
  d.backward({stream});
  ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
  cudaGraphExec_t exec;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  for (int rep = 0; rep < 3; ++rep) {
    ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    run.expect_same_as_eager("replay " + std::to_string(rep));
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}

// The block forward's routing (route_and_sort: one cooperative launch beyond 4096 slots where k divides the sort
// chunk and E <= 256, else route_topk and the sort's kernels) against route_topk on the same logits and the CPU's sort
// of its ids, exactly: several chunks per block and per warp (T = 20000: the experts' counts scanned by blocks), few
// chunks (T = 600: by warps), a chunk of 8 to 256 tokens (k = 32 to 1), and the other paths (4096 slots or fewer,
// E > 256, k = 3).
TEST(CudaBlock, RoutingMatchesRouteTopkAndSort) {
  REQUIRE_GPU();
  for (auto [T, E, k] : {std::tuple<int64_t, int, int>{600, 128, 8}, {2048, 128, 8}, {20000, 128, 8}, {1100, 64, 4},
                         {3000, 256, 16}, {500, 32, 32}, {5000, 8, 1}, {2999, 40, 2}, {1, 128, 8}, {777, 64, 4},
                         {600, 300, 8}, {2000, 12, 3}}) {
    BlockTensors b(MoeConfig{64, 32, E, k, true, DType::bf16}, T);
    DeviceBlock d(b, random_dout(b), kGpu);
    d.forward();
    const std::string what = "T " + std::to_string(T) + " E " + std::to_string(E) + " k " + std::to_string(k);
    DeviceCopy w(HostTensor(DType::bf16, {T, k}), kGpu, false), ids(HostTensor(DType::i32, {T, k}), kGpu, false);
    route_topk(d.logits.t, k, true, w.t, ids.t);
    const HostTensor ids_ref = ids.download();
    EXPECT_TRUE(d.fetch(d.saved.topk_ids).bitwise_equal(ids_ref)) << what;
    EXPECT_TRUE(d.fetch(d.saved.topk_weights).bitwise_equal(w.download())) << what;
    HostTensor gather(DType::i32, {T * k}), m_sizes(DType::i32, {E}), offsets(DType::i32, {E + 1});
    sort_by_expert(ids_ref.t, E, gather.t, m_sizes.t, offsets.t);
    EXPECT_EQ(d.fetch(d.saved.gather_indices).values(), gather.values()) << what;
    EXPECT_EQ(d.fetch(d.saved.m_sizes).values(), m_sizes.values()) << what;
    EXPECT_EQ(d.fetch(d.saved.expert_offsets).values(), offsets.values()) << what;
  }
}

// Output and input tensors of more than 2^31 elements: the row offsets must be 64-bit everywhere.
TEST(CudaOps, OffsetsPastTwoToThe31) {
  REQUIRE_GPU();
  const int64_t T = 32768, k = 8, M = T * k, N = 8192, K = 64;  // M·N = 2^31 elements (4 GiB in bf16)
  const int E = 8;
  Routing r(T, E, k);
  HostTensor X(DType::bf16, {T, K}), W(DType::bf16, {E, N, K});
  X.randn(), W.randn(0.125);
  DeviceCopy gX(X, kGpu), gW(W, kGpu), go(r.offsets, kGpu), gg(r.gather, kGpu);
  Buffer ybuf(static_cast<size_t>(M) * N * 2, kGpu);
  const Tensor Y = ybuf.view(DType::bf16, {M, N});
  const GroupedGemmArgs a{go.t, gg.t, static_cast<int>(k), true, true};
  grouped_gemm(gX.t, gW.t, a, Y);  // Y[slot] = x[token] · W[e]ᵀ, scattered to slot order
  // Check the last slots (offsets past 2^31 elements) and a few early ones on the host.
  auto expert_of_slot = [&](int64_t f) { return r.ids.i32(f); };
  std::vector<int64_t> slots = {0, 1, M / 2, M - 3, M - 2, M - 1};
  for (int64_t f : slots) {
    std::vector<uint16_t> row(N);
    copy_bytes(row.data(), Device::cpu(), static_cast<char*>(ybuf.data()) + f * N * 2, kGpu, N * 2);
    std::vector<double> got(N), ref(N, 0);
    const int64_t t = f / k, e = expert_of_slot(f);
    for (int64_t n = 0; n < N; ++n) {
      got[n] = num::bf16_to_float(row[n]);
      for (int64_t kk = 0; kk < K; ++kk) ref[n] += X.get(t * K + kk) * W.get((e * N + n) * K + kk);
    }
    EXPECT_CLOSE(got, ref, 1e-2) << "slot " << f;
  }
  // dW over the same 4 GiB operand: dW[e] = Σ_{i∈e} Y[slot]ᵀ · x[token]; spot-check entries.
  HostTensor dW(DType::bf16, {E, N, K});
  DeviceCopy gdW(dW, kGpu, false);
  grouped_gemm_dW(gX.t, Y, a, gdW.t);
  const HostTensor got_dw = gdW.download();
  std::vector<double> got, ref;
  for (auto [e, n, kk] : {std::tuple<int64_t, int64_t, int64_t>{0, 0, 0}, {E - 1, N - 1, K - 1}, {3, N / 2, 7}}) {
    double s = 0;
    for (int64_t i = r.offsets.i32(e); i < r.offsets.i32(e + 1); ++i) {
      const int64_t f = r.gather.i32(i), t = f / k;
      double y = 0;  // Y[f, n] in float64, rounded like the stored bf16 value
      for (int64_t q = 0; q < K; ++q) y += X.get(t * K + q) * W.get((e * N + n) * K + q);
      s += num::bf16_to_float(num::float_to_bf16(static_cast<float>(y))) * X.get(t * K + kk);
    }
    got.push_back(got_dw.get((e * N + n) * K + kk));
    ref.push_back(s);
  }
  EXPECT_CLOSE(got, ref, 1e-2);
}
#endif

TEST(CudaValidation, FloatThirtyTwoIsRejectedWithAClearError) {
  REQUIRE_GPU();
  BlockTensors b(MoeConfig{32, 16, 4, 2, true, DType::f32}, 4);
  HostTensor dout(DType::f32, {4, 32});
  try {
    run_block(b, dout, kGpu);
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("bfloat16 or float16"), std::string::npos) << e.what();
  }
}

}  // namespace
