// Bad input gets a fusedmoe::Error that names the argument and what was expected; nothing is written.
#include "testing.hpp"

using namespace fmt;

namespace {

// Runs fn, expecting a fusedmoe::Error whose message contains every fragment.
template <class Fn>
void expect_error(Fn&& fn, std::initializer_list<const char*> fragments) {
  try {
    fn();
    ADD_FAILURE() << "expected fusedmoe::Error";
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const char* f : fragments) EXPECT_NE(msg.find(f), std::string::npos) << "message: " << msg << "\nmissing: " << f;
  }
}

TEST(Validation, GroupedGemmShapesDtypesAndRouting) {
  const int64_t T = 6, k = 2, M = T * k, E = 3, N = 8, K = 5;
  HostTensor X(DType::bf16, {T, K}), W(DType::bf16, {E, N, K}), Y(DType::bf16, {M, N});
  HostTensor offs(DType::i32, {E + 1}), gather(DType::i32, {M});
  X.randn(), W.randn();
  for (int e = 0; e <= E; ++e) offs.set(e, e * 4);
  for (int i = 0; i < M; ++i) gather.set(i, i);
  GroupedGemmArgs a{offs.t, gather.t, static_cast<int>(k), true, false};
  grouped_gemm(X.t, W.t, a, Y.t);  // valid

  HostTensor Wbad(DType::bf16, {E, N, K + 1});
  expect_error([&] { grouped_gemm(X.t, Wbad.t, a, Y.t); }, {"grouped_gemm", "'W'", "[E, N, 5]"});
  HostTensor Wf32(DType::f32, {E, N, K});
  expect_error([&] { grouped_gemm(X.t, Wf32.t, a, Y.t); }, {"'W'", "bfloat16"});
  HostTensor Ybad(DType::bf16, {M, N + 1});
  expect_error([&] { grouped_gemm(X.t, W.t, a, Ybad.t); }, {"'Y'", "[12, 8]"});
  HostTensor Xrows(DType::bf16, {M, K});
  expect_error([&] { grouped_gemm(Xrows.t, W.t, a, Y.t); }, {"'X'", "6 rows"});
  GroupedGemmArgs tiled = a;
  tiled.tiling.cluster_m = 3;
  expect_error([&] { grouped_gemm(X.t, W.t, tiled, Y.t); }, {"grouped_gemm: args.tiling", "cluster_m", "[0, 2]"});
  tiled.tiling.cluster_m = 2;
  HostTensor dW(DType::bf16, {E, N, K});
  expect_error([&] { grouped_gemm_dW(X.t, Y.t, tiled, dW.t); }, {"grouped_gemm_dW: args.tiling", "cluster_m"});

  // A non-contiguous view (a transposed stride) is rejected.
  Tensor Xt = X.t;
  std::swap(Xt.strides[0], Xt.strides[1]);
  expect_error([&] { grouped_gemm(Xt, W.t, a, Y.t); }, {"'X'", "contiguous"});

  // Routing metadata out of range cannot make the CPU backend read or write out of bounds.
  offs.set(E, M + 1);
  expect_error([&] { grouped_gemm(X.t, W.t, a, Y.t); }, {"'expert_offsets'", "end at"});
  offs.set(E, M);
  offs.set(2, 1);
  expect_error([&] { grouped_gemm(X.t, W.t, a, Y.t); }, {"'expert_offsets'", "non-decreasing"});
  offs.set(2, 8);
  gather.set(3, M);
  expect_error([&] { grouped_gemm(X.t, W.t, a, Y.t); }, {"'gather_indices'", "[0, 12)"});
  gather.set(3, 3);
  a.top_k = 5;
  expect_error([&] { grouped_gemm(X.t, W.t, a, Y.t); }, {"multiple of top_k"});
  a.top_k = 2;
  HostTensor offs64(DType::i64, {E + 1});
  GroupedGemmArgs a64{offs64.t, gather.t, 2, true, false};
  expect_error([&] { grouped_gemm(X.t, W.t, a64, Y.t); }, {"'expert_offsets'", "int32"});
  HostTensor rw(DType::f32, {T, k + 1});
  expect_error([&] { grouped_gemm(X.t, W.t, a, Y.t, rw.t); }, {"'row_weights'"});
}

TEST(Validation, RouterArguments) {
  HostTensor logits(DType::f32, {4, 3}), w(DType::f32, {4, 4}), ids(DType::i32, {4, 4});
  logits.randn();
  expect_error([&] { route_topk(logits.t, 4, true, w.t, ids.t); }, {"'top_k'", "[1, 3]"});
  expect_error([&] { route_topk(logits.t, 0, true, w.t, ids.t); }, {"'top_k'"});
  HostTensor w2(DType::f32, {4, 2}), ids2(DType::i64, {4, 2});
  expect_error([&] { route_topk(logits.t, 2, true, w2.t, ids2.t); }, {"'topk_ids'", "int32"});

  HostTensor tid(DType::i32, {4, 2}), gather(DType::i32, {8}), ms(DType::i32, {3}), offs(DType::i32, {4});
  for (int i = 0; i < 8; ++i) tid.set(i, i % 3);
  tid.set(5, 3);
  expect_error([&] { sort_by_expert(tid.t, 3, gather.t, ms.t, offs.t); }, {"'topk_ids'", "[0, 3)"});
  expect_error([&] { sort_by_expert(tid.t, 3, gather.t, ms.t, HostTensor(DType::i32, {3}).t); },
               {"'expert_offsets'", "[4]"});

  HostTensor x(DType::bf16, {4, 8}), gate(DType::f16, {3, 8}), lg(DType::bf16, {4, 3});
  expect_error([&] { router_logits(x.t, gate.t, lg.t); }, {"'gate'", "bfloat16"});
  HostTensor gate8(DType::bf16, {3, 7});
  expect_error([&] { router_logits(x.t, gate8.t, lg.t); }, {"'gate'", "[*, 8]"});
}

TEST(Validation, BlockArguments) {
  MoeConfig cfg{16, 8, 4, 2, true, DType::bf16};
  BlockTensors b(cfg, 5);
  b.forward();
  std::vector<unsigned char> ws(moe_forward_workspace_bytes(cfg, 5) + 256);
  Workspace w{BlockTensors::aligned(ws), ws.size() - 256};
  MoeWeights wt = b.weights();

  MoeConfig bad = cfg;
  bad.top_k = 5;
  expect_error([&] { moe_forward(bad, b.x.t, wt, b.out.t, b.logits.t, b.saved, w); }, {"top_k", "[1, num_experts"});
  bad = cfg;
  bad.dtype = DType::i32;
  expect_error([&] { bad.validate(); }, {"dtype"});
  // Kernel choices: each family and field is named with the values it takes.
  bad = cfg;
  bad.kernels.forward.block_n = 192;
  expect_error([&] { bad.validate(); }, {"kernels.forward", "block_n", "128 or 256", "192"});
  bad = cfg;
  bad.kernels.backward_dw.cluster_m = 2;
  expect_error([&] { moe_forward(bad, b.x.t, wt, b.out.t, b.logits.t, b.saved, w); },
               {"kernels.backward_dw", "cluster_m", "[0, 1]", "no shared weight tile"});
  bad = cfg;
  bad.kernels.backward_dx = GemmTiling{GemmKernel::portable, 256, 0};
  expect_error([&] { bad.validate(); }, {"kernels.backward_dx", "block_n", "portable"});
  bad = cfg;
  bad.kernels.forward.kernel = static_cast<GemmKernel>(7);
  expect_error([&] { bad.validate(); }, {"kernels.forward", "kernel must be automatic, wgmma or portable", "7"});
  bad = cfg;
  bad.kernels = {GemmTiling{GemmKernel::wgmma, 256, 2}, GemmTiling{GemmKernel::portable, 128, 1},
                 GemmTiling{GemmKernel::wgmma, 128, 1}};
  bad.validate();  // every field in range: accepted (the CPU backend ignores the choice)

  HostTensor w1_bad(DType::bf16, {4, 8, 16});
  wt.gate_up_proj = w1_bad.t;
  expect_error([&] { moe_forward(cfg, b.x.t, wt, b.out.t, b.logits.t, b.saved, w); }, {"'gate_up_proj'", "[4, 16, 16]"});
  wt = b.weights();
  HostTensor x32(DType::f32, {5, 16});
  expect_error([&] { moe_forward(cfg, x32.t, wt, b.out.t, b.logits.t, b.saved, w); }, {"'x'", "bfloat16"});
  expect_error([&] { moe_forward(cfg, b.x.t, wt, b.out.t, b.logits.t, b.saved, Workspace{w.data, 16}); },
               {"'workspace'", "bytes"});
  HostTensor out_small(DType::bf16, {4, 16});
  expect_error([&] { moe_forward(cfg, b.x.t, wt, out_small.t, b.logits.t, b.saved, w); }, {"'out'", "[5, 16]"});
  Tensor on_gpu = b.x.t;
  on_gpu.device = Device::cuda(0);
  expect_error([&] { moe_forward(cfg, b.x.t, wt, on_gpu, b.logits.t, b.saved, w); }, {"'out'", "cpu"});

  // Backward: a wrongly-shaped gradient buffer is named.
  HostTensor dout(DType::bf16, {5, 16}), dw2_bad(DType::bf16, {4, 8, 16});
  MoeGrads g;
  g.d_down_proj = dw2_bad.t;
  std::vector<unsigned char> bws(1 << 20);
  expect_error([&] { moe_backward(cfg, dout.t, b.x.t, wt, b.logits.t, b.saved, g, {BlockTensors::aligned(bws), 1 << 19}); },
               {"'grads.d_down_proj'", "[4, 16, 8]"});
}

TEST(Validation, TensorBasics) {
  EXPECT_THROW(Tensor::contiguous(nullptr, DType::f32, {1, 2, 3, 4, 5}), Error);
  EXPECT_THROW(Tensor::contiguous(nullptr, DType::f32, {2, -1}), Error);
  Buffer buf(64, Device::cpu());
  EXPECT_THROW(buf.view(DType::f32, {17}), Error);
  EXPECT_NO_THROW(buf.view(DType::f32, {16}));
}

}  // namespace
