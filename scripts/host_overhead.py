"""Where a block call's time goes on the GPU machine: host (Python + launch) time per call without a sync,
GPU time by CUDA events, and the profiler's kernel list, for the fusedmoe block at a few token counts.
Shows whether small-T timings are host-bound (the GPU waiting for launches). --cprofile instead prints
the host-side cProfile of 200 forward calls at the first T.
    python scripts/host_overhead.py [--cprofile] [T ...]"""
import cProfile
import pstats
import sys
import time
from types import SimpleNamespace

import torch

import fusedmoe
from fusedmoe.bench import PRESETS, Shape, make_weights


def make_block(dev, dt, gen, autotune):
    p = PRESETS["qwen3-30b-a3b"]
    shape = Shape(p["hidden"], p["intermediate"], p["experts"], p["top_k"])
    (gate, w1, w2), _ = make_weights(shape, dev, dt, 0.0, gen)
    cfg = SimpleNamespace(num_experts=shape.E, num_experts_per_tok=shape.k, hidden_size=shape.H,
                          moe_intermediate_size=shape.I, norm_topk_prob=True)
    return fusedmoe.Qwen3MoeFusedGroupedGEMMBlock(cfg, gate, w1, w2, autotune=autotune), shape


def timings(block, x):
    with torch.no_grad():
        for _ in range(3):
            block(x)
        torch.cuda.synchronize()
        n = 20
        t0 = time.perf_counter()
        for _ in range(n):
            block(x)
        host = (time.perf_counter() - t0) / n * 1e3
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / n * 1e3
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(n):
            block(x)
        b.record()
        b.synchronize()
        events = a.elapsed_time(b) / n
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA], acc_events=True) as prof:
            block(x)
            torch.cuda.synchronize()
    kernels = [(e.key, e.device_time_total / 1e3) for e in prof.key_averages() if e.device_time_total > 0]
    return host, wall, events, kernels


def cprofile(block, x):
    with torch.no_grad():
        for _ in range(5):
            block(x)
        torch.cuda.synchronize()
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(200):
            block(x)
            torch.cuda.synchronize()
        pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(18)


def main():
    args = sys.argv[1:]
    profile = "--cprofile" in args
    Ts = [int(a) for a in args if a != "--cprofile"] or [2048, 16384]
    dev, dt = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    for autotune in ((False,) if profile else (False, True)):
        block, shape = make_block(dev, dt, gen, autotune)
        for T in Ts[:1] if profile else Ts:
            x = torch.randn(1, T, shape.H, device=dev, dtype=dt, generator=gen)
            if profile:
                cprofile(block, x)
                continue
            host, wall, events, kernels = timings(block, x)
            print(f"autotune={autotune} T={T}: host {host:.3f} ms/call (no sync), wall {wall:.3f}, "
                  f"events {events:.3f}, kernels {sum(k for _, k in kernels):.3f} ms")
            for name, ms in sorted(kernels, key=lambda k: -k[1])[:10]:
                print(f"    {ms:8.3f}  {name[:110]}")


if __name__ == "__main__":
    main()
