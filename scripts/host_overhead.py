"""Where a block call's time goes on the GPU machine: host (Python + launch) time per call without a sync,
GPU time by CUDA events, and the profiler's kernel list, for the fusedmoe block at a few token counts.
Shows whether small-T timings are host-bound (the GPU waiting for launches).
    python scripts/host_overhead.py [T ...]"""
import sys
import time
from types import SimpleNamespace

import torch

import fusedmoe
from fusedmoe.bench import PRESETS, Shape, make_weights


def main():
    Ts = [int(a) for a in sys.argv[1:]] or [2048, 16384]
    dev, dt = torch.device("cuda"), torch.bfloat16
    p = PRESETS["qwen3-30b-a3b"]
    shape = Shape(p["hidden"], p["intermediate"], p["experts"], p["top_k"])
    gen = torch.Generator(device=dev).manual_seed(0)
    (gate, w1, w2), _ = make_weights(shape, dev, dt, 0.0, gen)
    cfg = SimpleNamespace(num_experts=shape.E, num_experts_per_tok=shape.k, hidden_size=shape.H,
               moe_intermediate_size=shape.I, norm_topk_prob=True)
    for autotune in (False, True):
        block = fusedmoe.Qwen3MoeFusedGroupedGEMMBlock(cfg, gate.clone(), w1.clone(), w2.clone(), autotune=autotune)
        for T in Ts:
            x = torch.randn(1, T, shape.H, device=dev, dtype=dt, generator=gen)
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
                ev = a.elapsed_time(b) / n
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA], acc_events=True) as prof:
                    block(x)
                    torch.cuda.synchronize()
                kern = [(e.key, e.device_time_total / 1e3) for e in prof.key_averages() if e.device_time_total > 0]
            print(f"autotune={autotune} T={T}: host {host:.3f} ms/call (no sync), wall {wall:.3f}, events {ev:.3f}, "
                  f"kernels {sum(k for _, k in kern):.3f} ms")
            for name, ms in sorted(kern, key=lambda k: -k[1])[:10]:
                print(f"    {ms:8.3f}  {name[:110]}")


if __name__ == "__main__":
    main()
