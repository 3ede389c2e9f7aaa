"""Where a block call's time goes on the GPU machine, for the fusedmoe block at a few token counts:
host (Python + launch) time per call without a sync, GPU time by CUDA events (one synchronised step at a
time, as the bench measures, and back to back, where the host's latency at a step's start hides behind the
previous step), and the profiler's kernel list with the GPU's busy time, so the gap between the two (the GPU
waiting for launches) shows. --fwdbwd times forward+backward steps as the bench does
(weights and x requiring grad); --grouped-mm adds the bench's torch._grouped_mm block for comparison;
--cprofile instead prints the host-side cProfile of 200 forward calls at the first T. With --fwdbwd the
block's forward and backward also record CUDA events where they start and end, which shows without a
profiler's overhead where in a synchronised step the GPU waits for the host.
--launches lists the profiled step's host-side CUDA calls next to the kernels' GPU times. --autotune builds the
block with autotune=True, as the bench does (default: the shipped heuristic).
--marks prints, for synchronised steps as the bench times them and for back-to-back ones, the host clock at
marks inside the block's Python path (its forward, the ops' config, allocations, DLPack conversion and the
extension call) and the GPU-side time at which the stream reaches the first extension call.
--ops prints the host cost of single calls the block's path is made of (an allocation, a DLPack conversion, a
kernel launch through torch and through the extension, ...), each right after a synchronisation (as the bench's
steps start) and back to back.
    python scripts/host_overhead.py [--fwdbwd] [--grouped-mm] [--autotune] [--cprofile] [--launches] [--marks] [--ops] [T ...]"""
import cProfile
import pstats
import statistics
import sys
import time

import torch

import fusedmoe
from fusedmoe.bench import PRESETS, Shape, Timer, build_impls, make_weights


def make_impls(dev, dt, gen, autotune, grouped_mm):
    p = PRESETS["qwen3-30b-a3b"]
    shape = Shape(p["hidden"], p["intermediate"], p["experts"], p["top_k"])
    weights, _ = make_weights(shape, dev, dt, 0.0, gen)
    names = ["fusedmoe"] + (["torch_grouped_mm"] if grouped_mm else [])
    impls, skipped = build_impls(names, shape, weights, True, dev, dt, autotune=autotune)
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    return impls, shape


def step_of(fn, x, backward):
    """One step as the bench runs it: a forward under no_grad, or forward+backward with every grad cleared."""
    if not backward:
        def step():
            with torch.no_grad():
                fn(x)
        return step
    for p in fn.params:
        p.requires_grad_(True)
    xg = x.clone().requires_grad_()
    grad = torch.randn_like(fn(xg)[0])

    def step():
        fn(xg)[0].backward(grad)
        for p in fn.params:
            p.grad = None
        xg.grad = None
    return step


def busy_ms(intervals):
    """Length of the union of [start, end) intervals (µs in, ms out)."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total / 1e3


TIMED_STEPS = 20


def timings(step):
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    n = TIMED_STEPS
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    host = (time.perf_counter() - t0) / n * 1e3
    end.record()
    torch.cuda.synchronize()
    # The same steps back to back (the host queues ahead; no synchronisation between them): GPU ms per step where
    # the host's latency at a step's start is hidden behind the previous step's kernels.
    pipelined = start.elapsed_time(end) / n
    before = torch.cuda.memory_stats()
    events = Timer(torch.device("cuda"))(step, 0, n)  # median of synchronised steps, as the bench times them
    after = torch.cuda.memory_stats()
    # The caching allocator's trips to the driver during those steps (cudaMalloc / cudaFree, the latter
    # synchronising the device, and retries after freeing its cache): none in a steady state.
    alloc = {k: after.get(k, 0) - before.get(k, 0) for k in ("num_device_alloc", "num_device_free", "num_alloc_retries")}
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        step()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    spans = [(e.time_range.start, e.time_range.end) for e in kernels]
    span = (max(e for _, e in spans) - min(s for s, _ in spans)) / 1e3 if spans else 0.0
    per_name = {}
    for e in kernels:
        per_name[e.name] = per_name.get(e.name, 0.0) + (e.time_range.end - e.time_range.start) / 1e3
    # The GPU's idle stretches between consecutive kernels (under the profiler, whose launch overhead adds to
    # host-bound gaps): where in the step the GPU waited.
    gaps = [(b.time_range.start - a.time_range.end, a.name, b.name) for a, b in zip(kernels, kernels[1:])]
    return host, events, busy_ms(spans), span, per_name, gaps, prof, alloc, pipelined


def launch_trace(prof, limit):
    """The profiled step's host-side CUDA API calls and aten ops next to the kernels' GPU times (µs from the
    step's first event), in start order: which host work the GPU waits for before each kernel."""
    evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
           or e.name.startswith(("cuda", "cu", "aten::empty"))]
    evs.sort(key=lambda e: e.time_range.start)
    if not evs:
        return
    t0 = evs[0].time_range.start
    print("  launch trace (µs from the step's first event; GPU rows are kernels):")
    for e in evs[:limit]:
        where = "GPU" if e.device_type == torch.autograd.DeviceType.CUDA else "host"
        print(f"    {e.time_range.start - t0:9.1f} +{e.time_range.end - e.time_range.start:8.1f}  {where:4}  "
              f"{short(e.name)[:90]}")


def short(name):
    name = name.replace("fusedmoe::detail::cuda::", "").replace("(anonymous namespace)::", "")
    return name[5:] if name.startswith("void ") else name


class Timeline:
    """CUDA events at the start and end of the eager block's forward and backward (patched in), and around a
    step: their GPU-side distances are the GPU's waits for the host (no profiler, so no profiler overhead)."""

    MARKS = ("step", "fwd start", "fwd end", "bwd start", "bwd end", "step end")

    def __init__(self):
        self.events, self.host = {}, {}
        ops = fusedmoe._ops
        F = ops._MoeBlockFunction
        fwd, bwd = ops._moe_block_eager, F.backward  # (the eager forward launches its kernels before the Function)

        def forward(*args):
            self.mark("fwd start")
            out = fwd(*args)
            self.mark("fwd end")
            return out

        def backward(ctx, *grads):
            self.mark("bwd start")
            out = bwd(ctx, *grads)
            self.mark("bwd end")
            return out

        ops._moe_block_eager, F.backward = forward, staticmethod(backward)

    def mark(self, name):
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        self.events[name] = e
        self.host[name] = time.perf_counter()

    def measure(self, step, n=20):
        """Medians of the GPU-side (events) and host-side (perf_counter at the same marks) intervals."""
        rows, host_rows = [], []
        for _ in range(n):
            self.events, self.host = {}, {}
            self.mark("step")
            step()
            self.mark("step end")
            self.events["step end"].synchronize()
            ev = [self.events[m] for m in self.MARKS]
            rows.append([a.elapsed_time(b) for a, b in zip(ev, ev[1:])])
            hs = [self.host[m] for m in self.MARKS]
            host_rows.append([(b - a) * 1e3 for a, b in zip(hs, hs[1:])])
        names = ["until fwd starts", "fwd", "fwd end -> bwd start", "bwd", "bwd end -> step end"]
        gpu = [statistics.median(c) for c in zip(*rows)]
        host = [statistics.median(c) for c in zip(*host_rows)]
        return ", ".join(f"{n} {g:.3f} (host {h:.3f})" for n, g, h in zip(names, gpu, host))


class HostMarks:
    """Host-clock marks inside the block's Python path (patched in): where a step's host time goes before the
    extension launches its kernels, for steps after a synchronisation (as the bench runs them) and back to back."""

    def __init__(self, block):
        self.t, self.event = [], None
        ops = fusedmoe._ops
        for name in ("_config", "_forward_plan", "_forward_outputs", "_backward_outputs", "_scratch"):
            if hasattr(ops, name):  # (older trees lack some: gpu_ab_bench.sh's AB_HOST runs this on them too)
                setattr(ops, name, self.wrapped(getattr(ops, name), name))
        block.forward = self.wrapped(block.forward, "block.forward")
        block.kernels_for = self.wrapped(block.kernels_for, "kernels_for")
        ext, marks = ops._ext, self

        class Ext:
            def __getattr__(self, name):
                fn = getattr(fusedmoe._C, name)

                def call(*args):
                    marks.mark(f"{name}: dlpack")
                    caps = [torch.utils.dlpack.to_dlpack(a) if isinstance(a, torch.Tensor) else a for a in args]
                    if marks.event is None:
                        marks.event = torch.cuda.Event(enable_timing=True)
                        marks.event.record()
                    marks.mark(f"{name}: C++ call")
                    out = fn(*caps)
                    marks.mark(f"{name}: C++ returned")
                    return out
                return call
        # (the eager path calls the extension's packed entry points itself, with its DLPack conversions done)
        ops._ext = ops._packed = Ext()

    def wrapped(self, fn, name):
        def call(*args, **kw):
            self.mark(name + " >")
            out = fn(*args, **kw)
            self.mark(name + " <")
            return out
        return call

    def mark(self, name):
        self.t.append((name, time.perf_counter()))

    def measure(self, step, synchronised, n=30):
        rows, gpu = [], []
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        for _ in range(n):
            start = torch.cuda.Event(enable_timing=True)
            self.t, self.event = [], None
            start.record()
            t0 = time.perf_counter()
            step()
            self.mark("step returned")
            if synchronised:
                torch.cuda.synchronize()
                gpu.append(start.elapsed_time(self.event) * 1e3)
            rows.append([(name, (t - t0) * 1e6) for name, t in self.t])
        if not synchronised:
            torch.cuda.synchronize()
        names = [name for name, _ in rows[0]]
        med = [statistics.median(r[i][1] for r in rows) for i in range(len(names))]
        lines = [f"    {m:8.1f} µs  {name}" for name, m in zip(names, med)]
        if gpu:
            lines.append(f"    GPU reaches the first extension call {statistics.median(gpu):.1f} µs after the step's start")
        return "\n".join(lines)


def op_costs():
    """Median host µs of single calls after a synchronisation (the GPU idle, as at a bench step's start) and back
    to back (the same call repeated without a sync)."""
    dev = torch.device("cuda")
    x = torch.randn(4096, 2048, device=dev, dtype=torch.bfloat16)
    small = torch.zeros(256, device=dev)
    ids = torch.randint(0, 128, (512, 8), device=dev, dtype=torch.int32)
    gather, m_sizes, offsets = (torch.empty(4096, device=dev, dtype=torch.int32),
                                torch.empty(128, device=dev, dtype=torch.int32), torch.empty(129, device=dev, dtype=torch.int32))
    cfg = fusedmoe._C.Config(2048, 768, 128, 8, True, "bfloat16", [])
    raw = torch._C._cuda_getCurrentRawStream
    to_dlpack = torch.utils.dlpack.to_dlpack
    ops = {
        "torch.empty(1 MiB, uint8, cuda)": lambda: torch.empty(1 << 20, dtype=torch.uint8, device=dev),
        "x.new_empty(x.shape)": lambda: x.new_empty(x.shape),
        "to_dlpack(x)": lambda: to_dlpack(x),
        "x.__dlpack__()": lambda: x.__dlpack__(),
        "x.data_ptr()": lambda: x.data_ptr(),
        "x.device": lambda: x.device,
        "raw current stream": lambda: raw(0),
        "Event() + record()": lambda: torch.cuda.Event(enable_timing=True).record(),
        "small.add_(1) (a torch kernel launch)": lambda: small.add_(1),
        "_C.moe_saved_bytes (no tensors)": lambda: fusedmoe._C.moe_saved_bytes(cfg, 4096),
        "_C.sort_by_expert (4 DLPack, 3 launches)": lambda: fusedmoe._C.sort_by_expert(
            to_dlpack(ids), 128, to_dlpack(gather), to_dlpack(m_sizes), to_dlpack(offsets), raw(0)),
    }
    for name, fn in ops.items():
        for _ in range(20):
            fn()
        after_sync, back = [], []
        for _ in range(50):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            after_sync.append((time.perf_counter() - t0) * 1e6)
        torch.cuda.synchronize()
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(20):
                fn()
            back.append((time.perf_counter() - t0) / 20 * 1e6)
        torch.cuda.synchronize()
        print(f"  {statistics.median(after_sync):7.1f} µs after a sync, {min(back):7.1f} back to back  {name}")


def cprofile(step):
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(200):
        step()
        torch.cuda.synchronize()
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(18)


def main():
    args = sys.argv[1:]
    flags = {a for a in args if a.startswith("--")}
    unknown = flags - {"--autotune", "--cprofile", "--fwdbwd", "--grouped-mm", "--launches", "--marks", "--ops"}
    if unknown:
        sys.exit(f"unknown option(s) {sorted(unknown)}; usage: {__doc__.splitlines()[-1].strip()}")
    if "--ops" in flags:
        print("host cost of single calls (medians):")
        op_costs()
        return
    Ts = [int(a) for a in args if not a.startswith("--")] or [2048, 16384]
    backward = "--fwdbwd" in flags
    dev, dt = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    impls, shape = make_impls(dev, dt, gen, "--autotune" in flags, "--grouped-mm" in flags)
    timeline = Timeline() if backward and "--marks" not in flags else None
    marks = None
    for T in Ts[:1] if "--cprofile" in flags else Ts:
        x = torch.randn(T, shape.H, device=dev, dtype=dt, generator=gen)
        for name, fn in impls.items():
            step = step_of(fn, x, backward)
            if "--cprofile" in flags:
                cprofile(step)
                continue
            if "--marks" in flags:
                if name == "fusedmoe":
                    marks = marks or HostMarks(fn.block)
                    for synced in (True, False):
                        print(f"{name} T={T} {'fwd+bwd' if backward else 'fwd'} host marks (median µs from the step's "
                              f"start), {'synchronised steps' if synced else 'back to back'}:")
                        print(marks.measure(step, synced))
                continue
            host, events, busy, span, per_name, gaps, prof, alloc, pipelined = timings(step)
            print(f"{name} T={T} {'fwd+bwd' if backward else 'fwd'}: host {host:.3f} ms/step (no sync), events "
                  f"{events:.3f} ms (synchronised steps) / {pipelined:.3f} ms (back to back), GPU busy {busy:.3f} of "
                  f"a {span:.3f} ms kernel span (kernels {sum(per_name.values()):.3f} ms); allocator over "
                  f"{TIMED_STEPS} synchronised steps: {alloc}")
            if name == "fusedmoe" and getattr(fn, "block", None) is not None:
                print("  kernel configs (forward, dX, dW; None: the heuristic):", fn.block.kernel_configs(x, *fn.params))
            if timeline and name == "fusedmoe":
                print("  timeline (ms, medians; GPU by events, host by the clock):", timeline.measure(step))
            for kname, ms in sorted(per_name.items(), key=lambda k: -k[1])[:14]:
                print(f"    {ms:8.3f}  {short(kname)[:110]}")
            print(f"  idle between kernels {sum(g for g, _, _ in gaps) / 1e3:.3f} ms; the longest gaps (µs):")
            for g, a, b in sorted(gaps, reverse=True)[:6]:
                print(f"    {g:8.1f}  after {short(a)[:50]}  before {short(b)[:50]}")
            if "--launches" in flags and name == "fusedmoe":
                launch_trace(prof, 400)


if __name__ == "__main__":
    main()
