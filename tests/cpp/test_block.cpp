// The whole block on the CPU backend against the float64 reference (same routing decisions), the edge
// cases of DESIGN.md §5, finite differences in float64, the skip switches and determinism.
#include <set>

#include "testing.hpp"

using namespace fmt;

namespace {

// Workspace and gradient buffers for one backward call.
struct Backward {
  HostTensor dout, dx, dgate, dw1, dw2;
  explicit Backward(const BlockTensors& b) {
    const auto& c = b.cfg;
    const int64_t H = c.hidden_size, I = c.intermediate_size, E = c.num_experts;
    dout = random_dout(b);
    dx = HostTensor(c.dtype, {b.T, H});
    dgate = HostTensor(c.dtype, {E, H});
    dw1 = HostTensor(c.dtype, {E, 2 * I, H});
    dw2 = HostTensor(c.dtype, {E, H, I});
  }
  MoeGrads grads(bool want_dx, bool want_dgate, bool want_dw1, bool want_dw2) {
    MoeGrads g;
    if (want_dx) g.dx = dx.t;
    if (want_dgate) g.d_gate = dgate.t;
    if (want_dw1) g.d_gate_up_proj = dw1.t;
    if (want_dw2) g.d_down_proj = dw2.t;
    return g;
  }
  void run(BlockTensors& b, const MoeGrads& g) {
    for (HostTensor* h : {&dx, &dgate, &dw1, &dw2}) h->poison();
    std::vector<unsigned char> ws(moe_backward_workspace_bytes(b.cfg, b.T, g) + 256);
    moe_backward(b.cfg, dout.t, b.x.t, b.weights(), b.logits.t, b.saved, g,
                 {BlockTensors::aligned(ws), ws.size() - 256});
  }
};

class BlockTest : public ::testing::TestWithParam<BlockCase> {};

TEST_P(BlockTest, ForwardAndBackwardMatchFloat64Reference) {
  const BlockCase c = GetParam();
  BlockTensors b(MoeConfig{c.H, c.I, c.E, c.k, c.norm, c.dtype}, c.T);
  if (c.one_expert) steer_to_expert_zero(b);
  const HostTensor dout = random_dout(b);
  const BlockResult res = run_block(b, dout, Device::cpu());
  expect_block_matches_reference(b, dout, res);
  if (c.one_expert)
    for (int64_t t = 0; t < c.T; ++t) EXPECT_EQ(res.topk_ids.i32(t * c.k), 0) << "token " << t;
}

INSTANTIATE_TEST_SUITE_P(EdgeCases, BlockTest, ::testing::ValuesIn(edge_cases(/*with_wide_dtypes=*/true)),
                         [](const auto& info) { return std::string(info.param.name); });

// Gradients of L = Σ dOut ⊙ out by central differences, entirely in float64.
TEST(BlockGradients, MatchCentralFiniteDifferencesInFloat64) {
  for (bool norm : {true, false}) {
    MoeConfig cfg{12, 6, 5, 2, norm, DType::f64};
    BlockTensors b(cfg, 4);
    b.forward();
    const auto ids0 = b.ids();
    Backward bw(b);
    bw.run(b, bw.grads(true, true, true, true));
    auto loss = [&]() {
      b.forward();
      EXPECT_EQ(b.ids(), ids0) << "perturbation changed the routing; pick another seed";
      double L = 0;
      for (int64_t i = 0; i < b.out.numel(); ++i) L += bw.dout.get(i) * b.out.get(i);
      return L;
    };
    auto fd_of = [&](HostTensor& param) {
      std::vector<double> g(param.numel());
      const double eps = 1e-6;
      for (int64_t i = 0; i < param.numel(); ++i) {
        const double v = param.get(i);
        param.set(i, v + eps);
        const double lp = loss();
        param.set(i, v - eps);
        const double lm = loss();
        param.set(i, v);
        g[i] = (lp - lm) / (2 * eps);
      }
      return g;
    };
    EXPECT_CLOSE(bw.dx.values(), fd_of(b.x), 1e-6);
    EXPECT_CLOSE(bw.dgate.values(), fd_of(b.gate), 1e-6);
    EXPECT_CLOSE(bw.dw1.values(), fd_of(b.w1), 1e-6);
    EXPECT_CLOSE(bw.dw2.values(), fd_of(b.w2), 1e-6);
  }
}

// Unwanted gradients are neither computed nor written; wanted ones equal the full run's bitwise.
TEST(BlockGradients, SkipSwitchesLeaveUnwantedOutputsUntouched) {
  MoeConfig cfg{40, 24, 6, 2, true, DType::bf16};
  BlockTensors b(cfg, 17);
  b.forward();
  Backward full(b);
  full.run(b, full.grads(true, true, true, true));
  struct Want { bool dx, dgate, dw1, dw2; };
  for (Want wnt : {Want{true, true, false, false}, Want{false, false, true, true}, Want{false, true, false, false},
                   Want{false, false, false, true}, Want{true, false, false, false}}) {
    Backward part(b);
    part.dout = full.dout;
    const MoeGrads g = part.grads(wnt.dx, wnt.dgate, wnt.dw1, wnt.dw2);
    EXPECT_LE(moe_backward_workspace_bytes(cfg, b.T, g), moe_backward_workspace_bytes(cfg, b.T, full.grads(1, 1, 1, 1)));
    part.run(b, g);
    const std::pair<bool, std::pair<HostTensor*, HostTensor*>> outs[] = {
        {wnt.dx, {&part.dx, &full.dx}}, {wnt.dgate, {&part.dgate, &full.dgate}},
        {wnt.dw1, {&part.dw1, &full.dw1}}, {wnt.dw2, {&part.dw2, &full.dw2}}};
    for (const auto& [wanted, pair] : outs) {
      if (wanted)
        EXPECT_TRUE(pair.first->bitwise_equal(*pair.second));
      else
        EXPECT_FALSE(pair.first->all_finite()) << "an unwanted gradient was written";
    }
  }
  // Frozen experts and no dx: the workspace shrinks to the router's needs.
  EXPECT_LT(moe_backward_workspace_bytes(cfg, b.T, full.grads(false, true, false, false)),
            moe_backward_workspace_bytes(cfg, b.T, full.grads(true, true, true, true)));
}

TEST(Block, DeterministicBitwise) {
  MoeConfig cfg{96, 48, 9, 3, true, DType::bf16};
  BlockTensors b(cfg, 50);
  b.forward();
  HostTensor out1 = b.out;
  Backward bw(b);
  bw.run(b, bw.grads(1, 1, 1, 1));
  HostTensor dx1 = bw.dx, dw1 = bw.dw1;
  b.forward();
  EXPECT_TRUE(b.out.bitwise_equal(out1));
  bw.run(b, bw.grads(1, 1, 1, 1));
  EXPECT_TRUE(bw.dx.bitwise_equal(dx1));
  EXPECT_TRUE(bw.dw1.bitwise_equal(dw1));
}

TEST(Block, InferenceForwardKeepsNoGateUpAndMatches) {
  expect_inference_forward_matches(MoeConfig{48, 24, 6, 2, true, DType::bf16}, 29, Device::cpu());
  expect_inference_forward_matches(MoeConfig{40, 20, 5, 3, false, DType::f32}, 17, Device::cpu());
}

TEST(Block, ZeroTokens) {
  MoeConfig cfg{16, 8, 4, 2, true, DType::f32};
  BlockTensors b(cfg, 0);
  b.forward();
  Backward bw(b);
  bw.run(b, bw.grads(1, 1, 1, 1));
  EXPECT_TRUE(bw.dw1.all_finite());
  for (double v : bw.dw1.values()) EXPECT_EQ(v, 0.0);
  for (double v : bw.dgate.values()) EXPECT_EQ(v, 0.0);
}

TEST(Block, FlopCountsFollowDesign) {
  const MoeConfig c = qwen3_30b_a3b_config();
  EXPECT_DOUBLE_EQ(c.forward_flops(16384), 6.0 * 16384 * 8 * 2048 * 768);
  EXPECT_DOUBLE_EQ(c.backward_flops(16384, true), 12.0 * 16384 * 8 * 2048 * 768);
  EXPECT_DOUBLE_EQ(c.backward_flops(16384, false), 6.0 * 16384 * 8 * 2048 * 768);
}

}  // namespace

namespace {

// The experts alone, given the block's own routing: same output bitwise, and dw against float64.
TEST(BlockExperts, GivenRoutingMatchTheBlockAndReference) {
  MoeConfig cfg{48, 24, 6, 2, true, DType::bf16};
  const int64_t T = 29, H = 48;
  BlockTensors b(cfg, T);
  b.forward();
  HostTensor out(DType::bf16, {T, H}), dout(DType::bf16, {T, H}), dw(DType::f32, {T, 2});
  HostTensor dw1(DType::bf16, {6, 48, 48}), dw2(DType::bf16, {6, 48, 24});
  dout.randn();
  out.poison(), dw.poison();
  std::vector<unsigned char> saved_mem(moe_saved_bytes(cfg, T) + 256), ws(moe_forward_workspace_bytes(cfg, T) + 256);
  const MoeSaved saved = moe_saved_views(cfg, T, BlockTensors::aligned(saved_mem), Device::cpu());
  moe_experts_forward(cfg, b.x.t, b.saved.topk_weights, b.saved.topk_ids, b.weights(), out.t, saved,
                      {BlockTensors::aligned(ws), ws.size() - 256});
  EXPECT_TRUE(out.bitwise_equal(b.out));

  const MoeExpertGrads g{{}, dw.t, dw1.t, dw2.t};
  std::vector<unsigned char> bws(moe_experts_backward_workspace_bytes(cfg, T, g) + 256);
  moe_experts_backward(cfg, dout.t, b.x.t, b.saved.topk_weights, b.weights(), saved, g,
                       {BlockTensors::aligned(bws), bws.size() - 256});
  const RefProblem p = b.ref_problem();
  const RefRouting r = ref_routing(b.logits.values(), b.ids(), T, 6, 2, true);
  const RefForward f = ref_forward(p, r);
  std::vector<double> ref_dw(T * 2, 0);
  for (int64_t s = 0; s < T * 2; ++s)
    for (int64_t h = 0; h < H; ++h) ref_dw[s] += dout.get((s / 2) * H + h) * f.y2[s][h];
  EXPECT_CLOSE(dw.values(), ref_dw, 1e-2);
  const RefGrads rg = ref_backward(p, r, f, dout.values());
  EXPECT_CLOSE(dw1.values(), rg.dw1, 1e-2);
  EXPECT_CLOSE(dw2.values(), rg.dw2, 1e-2);
}

}  // namespace
