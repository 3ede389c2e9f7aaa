// A program that uses only fusedmoe's public API: a Qwen3-MoE-shaped layer with random weights, forward
// and backward on the best available backend, timed, with the error against the CPU oracle; also an inference
// forward (state for no backward: moe_saved_views(..., keep_gate_up = false)), timed.
//
//   moe_example [--tokens T] [--hidden H] [--intermediate I] [--experts E] [--top-k K] [--dtype bf16|f16|f32]
//               [--cpu] [--repeats R] [--no-check]   (--no-check: no comparison with the CPU oracle)
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "fusedmoe/fusedmoe.hpp"

using namespace fusedmoe;

namespace {

uint16_t to_bf16(float f) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
float from_bf16(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Host storage of one tensor in bf16 or f32 (the example keeps to these two).
struct HostArray {
  DType dtype;
  std::vector<uint16_t> h;
  std::vector<float> f;
  HostArray(DType dt, size_t n) : dtype(dt) { dt == DType::bf16 ? h.resize(n) : f.resize(n); }
  void* data() { return dtype == DType::bf16 ? static_cast<void*>(h.data()) : static_cast<void*>(f.data()); }
  size_t bytes() const { return dtype == DType::bf16 ? h.size() * 2 : f.size() * 4; }
  size_t size() const { return dtype == DType::bf16 ? h.size() : f.size(); }
  double get(size_t i) const { return dtype == DType::bf16 ? from_bf16(h[i]) : f[i]; }
  // Uniform values with standard deviation `scale` (fast enough for a billion weights).
  void random(uint64_t seed, float scale) {
    const float a = scale * std::sqrt(3.f);
    for (size_t i = 0; i < size(); ++i) {
      seed += 0x9e3779b97f4a7c15ull;  // splitmix64
      uint64_t z = seed;
      z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
      z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
      z ^= z >> 31;
      const float v = a * (static_cast<float>(z >> 40) * (2.f / 16777216.f) - 1.f);
      dtype == DType::bf16 ? void(h[i] = to_bf16(v)) : void(f[i] = v);
    }
  }
};

double rel_err(const HostArray& a, const HostArray& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = a.get(i) - b.get(i);
    num += d * d;
    den += b.get(i) * b.get(i);
  }
  return std::sqrt(num / (den > 0 ? den : 1));
}

// All device-side tensors of one run of the block.
struct Layer {
  MoeConfig cfg;
  int64_t T;
  Device dev;
  Buffer x, gate, w1, w2, out, logits, saved_mem, fwd_ws, dout, dx, dgate, dw1, dw2, bwd_ws, inference_mem;
  MoeSaved saved, inference_saved;  // inference: the state of a forward no backward follows (no Y1)
  MoeGrads grads;

  Layer(const MoeConfig& c, int64_t tokens, Device d) : cfg(c), T(tokens), dev(d) {
    const size_t es = dtype_size(c.dtype);
    const int64_t H = c.hidden_size, I = c.intermediate_size, E = c.num_experts;
    x = Buffer(T * H * es, d), gate = Buffer(E * H * es, d), w1 = Buffer(E * 2 * I * H * es, d);
    w2 = Buffer(E * H * I * es, d), out = Buffer(T * H * es, d), logits = Buffer(T * E * es, d);
    saved_mem = Buffer(moe_saved_bytes(c, T), d);
    saved = moe_saved_views(c, T, saved_mem.data(), d);
    fwd_ws = Buffer(moe_forward_workspace_bytes(c, T), d);
    inference_mem = Buffer(moe_saved_bytes(c, T, false), d);
    inference_saved = moe_saved_views(c, T, inference_mem.data(), d, false);
    dout = Buffer(T * H * es, d), dx = Buffer(T * H * es, d), dgate = Buffer(E * H * es, d);
    dw1 = Buffer(E * 2 * I * H * es, d), dw2 = Buffer(E * H * I * es, d);
    grads = {dx.view(c.dtype, {T, H}), dgate.view(c.dtype, {E, H}), dw1.view(c.dtype, {E, 2 * I, H}),
             dw2.view(c.dtype, {E, H, I})};
    bwd_ws = Buffer(moe_backward_workspace_bytes(c, T, grads), d);
  }
  MoeWeights weights() const {
    const int64_t H = cfg.hidden_size, I = cfg.intermediate_size, E = cfg.num_experts;
    return {gate.view(cfg.dtype, {E, H}), w1.view(cfg.dtype, {E, 2 * I, H}), w2.view(cfg.dtype, {E, H, I})};
  }
  void forward(Stream s = {}, bool inference = false) {
    moe_forward(cfg, x.view(cfg.dtype, {T, cfg.hidden_size}), weights(), out.view(cfg.dtype, {T, cfg.hidden_size}),
                logits.view(cfg.dtype, {T, cfg.num_experts}), inference ? inference_saved : saved,
                {fwd_ws.data(), fwd_ws.bytes()}, s);
  }
  void backward(Stream s = {}) {
    const Tensor xv = x.view(cfg.dtype, {T, cfg.hidden_size});
    moe_backward(cfg, dout.view(cfg.dtype, {T, cfg.hidden_size}), xv, weights(),
                 logits.view(cfg.dtype, {T, cfg.num_experts}), saved, grads, {bwd_ws.data(), bwd_ws.bytes()}, s);
  }
  void upload(Buffer& dst, HostArray& src) { copy_bytes(dst.data(), dev, src.data(), Device::cpu(), src.bytes()); }
  HostArray download(const Buffer& src, size_t n) {
    HostArray a(cfg.dtype, n);
    copy_bytes(a.data(), Device::cpu(), src.data(), dev, a.bytes());
    return a;
  }
};

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  MoeConfig cfg = qwen3_30b_a3b_config();
  int64_t T = 64;
  int repeats = 3;
  bool check = true;  // compare with the CPU oracle (minutes of CPU time at large T)
  bool force_cpu = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) { std::fprintf(stderr, "missing value after %s\n", a.c_str()); std::exit(2); }
      return argv[++i];
    };
    if (a == "--tokens") T = std::atoll(next());
    else if (a == "--hidden") cfg.hidden_size = std::atoll(next());
    else if (a == "--intermediate") cfg.intermediate_size = std::atoll(next());
    else if (a == "--experts") cfg.num_experts = std::atoi(next());
    else if (a == "--top-k") cfg.top_k = std::atoi(next());
    else if (a == "--repeats") repeats = std::max(1, std::atoi(next()));
    else if (a == "--cpu") force_cpu = true;
    else if (a == "--no-check") check = false;
    else if (a == "--dtype") {
      const std::string d = next();
      if (d == "bf16") cfg.dtype = DType::bf16;
      else if (d == "f32") cfg.dtype = DType::f32;
      else { std::fprintf(stderr, "--dtype: expected bf16 or f32, got %s\n", d.c_str()); return 2; }
    } else {
      std::fprintf(stderr,
                   "usage: %s [--tokens T] [--hidden H] [--intermediate I] [--experts E] [--top-k K] "
                   "[--dtype bf16|f32] [--cpu] [--repeats R] [--no-check]\n", argv[0]);
      return a == "--help" || a == "-h" ? 0 : 2;
    }
  }
  try {
    cfg.validate();
    const bool gpu = !force_cpu && cuda_available();
    const Device dev = gpu ? Device::cuda(0) : Device::cpu();
    const int64_t H = cfg.hidden_size, I = cfg.intermediate_size, E = cfg.num_experts;
    std::printf("fusedmoe %s example: T=%lld H=%lld I=%lld E=%d k=%d %s on %s\n", version(), (long long)T,
                (long long)H, (long long)I, E, cfg.top_k, dtype_name(cfg.dtype), device_name(dev).c_str());

    std::random_device rd;
    auto seed = [&] { return (static_cast<uint64_t>(rd()) << 32) | rd(); };
    HostArray x(cfg.dtype, T * H), gate(cfg.dtype, E * H), w1(cfg.dtype, E * 2 * I * H), w2(cfg.dtype, E * H * I),
        dout(cfg.dtype, T * H);
    x.random(seed(), 1.f), gate.random(seed(), 0.02f), w1.random(seed(), 1.f / std::sqrt(float(H)));
    w2.random(seed(), 1.f / std::sqrt(float(I))), dout.random(seed(), 1.f);

    Layer layer(cfg, T, dev);
    layer.upload(layer.x, x), layer.upload(layer.gate, gate), layer.upload(layer.w1, w1);
    layer.upload(layer.w2, w2), layer.upload(layer.dout, dout);

    // Warm-up, then timed repeats (synchronous copies below order the device work).
    layer.forward();
    layer.backward();
    double fwd = 1e30, bwd = 1e30, inf = 1e30;
    for (int r = 0; r < repeats; ++r) {
      auto t0 = std::chrono::steady_clock::now();
      layer.forward({}, /*inference=*/true);
      if (gpu) layer.download(layer.out, 1);
      inf = std::min(inf, seconds_since(t0));
      t0 = std::chrono::steady_clock::now();
      layer.forward();
      if (gpu) layer.download(layer.out, 1);
      fwd = std::min(fwd, seconds_since(t0));
      t0 = std::chrono::steady_clock::now();
      layer.backward();
      if (gpu) layer.download(layer.dx, 1);
      bwd = std::min(bwd, seconds_since(t0));
    }
    std::printf("forward : %9.3f ms  %8.3f TFLOP/s\n", fwd * 1e3, cfg.forward_flops(T) / fwd * 1e-12);
    std::printf("backward: %9.3f ms  %8.3f TFLOP/s\n", bwd * 1e3, cfg.backward_flops(T, true) / bwd * 1e-12);
    std::printf("inference forward: %9.3f ms  %8.3f TFLOP/s  (no state kept for a backward)\n", inf * 1e3,
                cfg.forward_flops(T) / inf * 1e-12);

    // Error against the CPU oracle (on the CPU itself, this compares the backend with itself).
    if (gpu && check) {
      Layer oracle(cfg, T, Device::cpu());
      oracle.upload(oracle.x, x), oracle.upload(oracle.gate, gate), oracle.upload(oracle.w1, w1);
      oracle.upload(oracle.w2, w2), oracle.upload(oracle.dout, dout);
      oracle.forward();
      oracle.backward();
      std::printf("rel. error vs CPU oracle: out %.2e  dx %.2e  d_gate_up_proj %.2e  d_down_proj %.2e\n",
                  rel_err(layer.download(layer.out, T * H), oracle.download(oracle.out, T * H)),
                  rel_err(layer.download(layer.dx, T * H), oracle.download(oracle.dx, T * H)),
                  rel_err(layer.download(layer.dw1, E * 2 * I * H), oracle.download(oracle.dw1, E * 2 * I * H)),
                  rel_err(layer.download(layer.dw2, E * H * I), oracle.download(oracle.dw2, E * H * I)));
    } else if (!gpu) {
      std::printf("(CPU backend: it is the oracle; run on a Hopper GPU to compare)\n");
    }
  } catch (const Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}
