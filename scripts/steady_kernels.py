"""Per-kernel GPU time per step at the bench's steady state, for the fusedmoe block and the dense equivalent (and
optionally the torch._grouped_mm block) side by side: which kernels the gap between them is made of under the
conditions the targets are judged in (a sustained loop at the card's power limit), not under ncu's fixed clocks.

Each implementation first runs its steps back to back for --warmup-ms (the bench's 500 ms), then --steps more
under torch.profiler (CUDA activity only) without a synchronisation between them; the table gives each kernel's
mean µs per step, the sum of the kernels, and the wall time per step of the profiled loop (CUDA events around it).
    python scripts/steady_kernels.py [--tokens 16384 ...] [--modes fwd fwdbwd] [--grouped-mm] [--warmup-ms 500]
                                     [--steps 20] [--no-dense] [--gaps US]"""
import argparse
import re
import time
from collections import defaultdict

import torch

from fusedmoe.bench import DenseEquivalent
from host_overhead import make_impls, short, step_of  # this folder: the bench's impls and steps


def kernel_name(name: str) -> str:
    """A kernel's name without its arguments, short enough for a table row; the sm90 GEMMs keep the template
    arguments that tell them apart (tile width, kind 0 nt / 1 nn / 2 tn, gated, cluster)."""
    name = short(name)
    head, _, tail = name.partition("<")
    if head.endswith("gemm_sm90_kernel") and tail:
        args = [a.strip() for a in tail.split(">(")[0].split(",")]
        return "gemm_sm90<" + ",".join(re.sub(r"^\(.*\)", "", a) for a in args[1:6]) + ">"
    return head.partition("(")[0][:100]


def gaps_by_pair(spans, steps):
    """{(previous activity, next activity): (idle µs per step, times per step)} over the GPU's idle intervals between
    consecutive activities (kernels, memsets, copies) of the profiled loop: where the GPU waited, for the host or
    for a launch, between two of our kernels."""
    idle = defaultdict(lambda: [0.0, 0])
    end, prev = None, None
    for start, stop, name in sorted(spans):
        if end is not None and start > end:
            row = idle[(prev, name)]
            row[0] += (start - end) / steps
            row[1] += 1
        if end is None or stop > end:
            end, prev = stop, name
    return {k: (v[0], v[1] / steps) for k, v in idle.items()}


def profile(step, warmup_ms, steps, host=False):
    """(wall ms per step, {kernel: (µs per step, launches per step)}, {(previous, next): (idle µs per step, times per
    step)}, the host's ms to issue a step, or None without `host`) of `steps` back-to-back steps after a back-to-back
    warm-up of warmup_ms."""
    step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while (time.perf_counter() - t0) * 1e3 < warmup_ms:
        step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(steps):
            step()
        end.record()
        torch.cuda.synchronize()
    # The host's time to issue the steps, from an idle GPU and without the profiler (after the profiled loop, which
    # thus follows the warm-up's queue as it always did): if it comes near the wall time per step, the host bounds
    # the back-to-back loop.
    host_ms = None
    if host:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        host_ms = (time.perf_counter() - t0) * 1e3 / steps
        torch.cuda.synchronize()
    per = defaultdict(lambda: [0.0, 0])
    spans = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            row = per[kernel_name(e.name)]
            row[0] += (e.time_range.end - e.time_range.start) / steps
            row[1] += 1
            spans.append((e.time_range.start, e.time_range.end, kernel_name(e.name)))
    return (start.elapsed_time(end) / steps, {k: (v[0], v[1] / steps) for k, v in per.items()},
            gaps_by_pair(spans, steps), host_ms)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[16384])
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    ap.add_argument("--grouped-mm", action="store_true", help="also the torch._grouped_mm block")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense equivalent (an A/B of our kernels)")
    ap.add_argument("--gaps", type=float, default=None, metavar="US",
                    help="also list the GPU's idle time between consecutive activities, by pair, where >= US µs per step")
    ap.add_argument("--warmup-ms", type=float, default=500.0)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    impls, shape = make_impls(dev, dt, gen, True, args.grouped_mm)
    print(f"{torch.cuda.get_device_name(dev)}; warm-up {args.warmup_ms:.0f} ms back to back, then {args.steps} "
          f"profiled steps back to back")
    for T in args.tokens:
        x = torch.randn(T, shape.H, device=dev, dtype=dt, generator=gen)
        dense = DenseEquivalent(shape, T, dev, dt)
        dense.params = list(dense.parameters())
        for mode in args.modes:
            backward = mode == "fwdbwd"
            rows = {}
            for name, fn in list(impls.items()) + ([] if args.no_dense else [("dense", dense)]):
                rows[name] = profile(step_of(fn, x, backward), args.warmup_ms, args.steps, host=args.gaps is not None)
            print(f"\nT={T} {mode}: wall ms per step / sum of kernels ms")
            for name, (wall, kernels, gaps, host_ms) in rows.items():
                total = sum(us for us, _ in kernels.values()) / 1e3
                print(f"  {name:18} {wall:8.3f} / {total:8.3f}")
                for k, (us, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0]):
                    print(f"      {us:9.1f} µs  x{n:4.1f}  {k}")
                if args.gaps is not None:
                    print(f"    GPU idle between activities: {sum(us for us, _ in gaps.values()):.1f} µs per step; the host "
                          f"issues a step in {host_ms * 1e3:.1f} µs (unprofiled, from an idle GPU)")
                    for (a, b), (us, n) in sorted(gaps.items(), key=lambda kv: -kv[1][0]):
                        if us >= args.gaps:
                            print(f"      {us:9.1f} µs  x{n:4.1f}  {a} -> {b}")


if __name__ == "__main__":
    main()
