"""fusedmoe's benchmark: the Qwen3-MoE block, side by side with the alternatives, in one run.

    python -m fusedmoe.bench                          # default sweep (GPU), or a small CPU run
    python -m fusedmoe.bench --model qwen3-235b-a22b --tokens 4096 16384 --modes fwd fwdbwd frozen
    python -m fusedmoe.bench --skew 2.0               # hot experts; reports the max/mean expert load

Implementations: fusedmoe; a block on torch._grouped_mm (router, argsort, two grouped GEMMs,
index-add combine); transformers' Qwen3MoeSparseMoeBlock as installed, built directly, and with each
other experts implementation transformers exposes; and the dense equivalent (two plain GEMMs with the
same FLOPs: the ceiling of any grouped GEMM). Each is checked against a float64 reference with the same
routing at a small T before it is timed; a wrong one is marked, not timed.
FLOPs: forward 6·T·k·H·I, backward 12·T·k·H·I (6 with frozen experts); the router is excluded.
Timing: CUDA events after warm-up, the median of --repeats runs (host clock on the CPU). The warm-up runs
at least --warmup steps and, on a GPU, at least --warmup-ms of them back to back: a large step (Qwen3-235B-A22B,
T=16384) takes ~10 ms, and three of them leave the card in its first, faster clocks before the power limit acts,
so short warm-ups timed the same code 8% apart from run to run (NOTES, session 22). On a GPU each row also
gets the time per step of as many steps run back to back (the GPU's own time, without the wait for the host at
a synchronised step's start), and, where NVML reads the card, the median SM clock, the mean power and the energy
per step over that sustained loop (the warm-up's second half and the timed steps), and whether the power cap
held the clock.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fusedmoe
from fusedmoe.gpu_meter import GpuMeter, Window

PRESETS = {
    "qwen3-30b-a3b": dict(hidden=2048, intermediate=768, experts=128, top_k=8),
    "qwen3-235b-a22b": dict(hidden=4096, intermediate=1536, experts=128, top_k=8),
    "tiny": dict(hidden=256, intermediate=128, experts=16, top_k=4),
}


@dataclass
class Shape:
    H: int
    I: int
    E: int
    k: int

    def flops(self, T: int, mode: str) -> float:
        fwd = 6.0 * T * self.k * self.H * self.I
        return {"fwd": fwd, "fwdbwd": 3 * fwd, "frozen": 2 * fwd}[mode]


# ----------------------------------------------------------------------------- implementations


class GroupedMMBlock(torch.nn.Module):
    """The block on torch._grouped_mm: what transformers 5 runs by default, written out."""

    def __init__(self, gate, w1, w2, k, norm):
        super().__init__()
        self.gate, self.w1, self.w2, self.k, self.norm = gate, w1, w2, k, norm

    def forward(self, x):
        T, H = x.shape
        logits = F.linear(x, self.gate)
        p = torch.softmax(logits, dim=-1, dtype=torch.float32)
        w, ids = torch.topk(p, self.k, dim=-1)
        if self.norm:
            w = w / w.sum(-1, keepdim=True)
        w = w.to(x.dtype)
        flat = ids.reshape(-1)
        perm = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.w1.shape[0])
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        tok = perm // self.k
        y1 = torch._grouped_mm(x[tok], self.w1.transpose(-2, -1), offs=offs)
        g, u = y1.chunk(2, dim=-1)
        y2 = torch._grouped_mm(F.silu(g) * u, self.w2.transpose(-2, -1), offs=offs)
        y2 = y2 * w.reshape(-1)[perm].unsqueeze(-1)
        return torch.zeros_like(x).index_add_(0, tok, y2), logits


class DenseEquivalent(torch.nn.Module):
    """Two plain GEMMs with the block's FLOPs: [M,H]·[H,2I] then [M,I]·[I,H], M = T·k."""

    def __init__(self, shape: Shape, T: int, device, dtype):
        super().__init__()
        M = T * shape.k
        self.a = torch.randn(M, shape.H, device=device, dtype=dtype)
        self.w1 = torch.nn.Parameter(torch.randn(shape.H, 2 * shape.I, device=device, dtype=dtype) * shape.H ** -0.5)
        self.w2 = torch.nn.Parameter(torch.randn(shape.I, shape.H, device=device, dtype=dtype) * shape.I ** -0.5)
        self.I = shape.I

    def forward(self, x):
        a = self.a.requires_grad_(x.requires_grad)
        return (a @ self.w1)[:, : self.I] @ self.w2, None


def build_impls(names, shape: Shape, weights, norm, device, dtype, autotune=True):
    gate, w1, w2 = weights
    impls, skipped = {}, {}
    for name in names:
        try:
            if name == "fusedmoe":
                cfg = type("Cfg", (), dict(num_experts=shape.E, num_experts_per_tok=shape.k, norm_topk_prob=norm,
                                           hidden_size=shape.H, moe_intermediate_size=shape.I, hidden_act="silu"))
                blk = fusedmoe.Qwen3MoeFusedGroupedGEMMBlock(cfg, torch.nn.Parameter(gate.clone()),
                                                             torch.nn.Parameter(w1.clone()),
                                                             torch.nn.Parameter(w2.clone()), autotune=autotune)
                impls[name] = lambda x, blk=blk: (lambda o: (o[0].view(x.shape), o[1]))(blk(x.unsqueeze(0)))
                impls[name].params = list(blk.parameters())
                impls[name].block = blk
            elif name == "torch_grouped_mm":
                if not hasattr(torch, "_grouped_mm"):
                    raise RuntimeError("torch._grouped_mm is not available in this torch")
                blk = GroupedMMBlock(torch.nn.Parameter(gate.clone()), torch.nn.Parameter(w1.clone()),
                                     torch.nn.Parameter(w2.clone()), shape.k, norm)
                impls[name] = blk
                impls[name].params = [blk.gate, blk.w1, blk.w2]
            elif name.startswith("hf"):
                impl = name.split(":", 1)[1] if ":" in name else None
                impls[name] = build_hf(shape, gate, w1, w2, norm, impl)
            else:
                raise ValueError(f"unknown implementation {name!r}")
        except Exception as e:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
            skipped[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return impls, skipped


def build_hf(shape, gate, w1, w2, norm, experts_impl):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = Qwen3MoeConfig(hidden_size=shape.H, moe_intermediate_size=shape.I, num_experts=shape.E,
                         num_experts_per_tok=shape.k, norm_topk_prob=norm, hidden_act="silu")
    if experts_impl:
        cfg._experts_implementation = experts_impl
    blk = Qwen3MoeSparseMoeBlock(cfg).to(device=gate.device, dtype=gate.dtype)
    with torch.no_grad():
        blk.gate.weight.copy_(gate)
        blk.experts.gate_up_proj.copy_(w1)
        blk.experts.down_proj.copy_(w2)

    def run(x):
        return blk(x.unsqueeze(0)).view(x.shape), None

    run.params = list(blk.parameters())
    return run


def transformers_experts_impls():
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return []
    return [f"hf:{n}" for n in sorted(ALL_EXPERTS_FUNCTIONS.keys()) if n != "fusedmoe"]


# ----------------------------------------------------------------------------- inputs, checking, timing


def make_weights(shape: Shape, device, dtype, skew: float, gen):
    H, I, E = shape.H, shape.I, shape.E
    gate = torch.randn(E, H, generator=gen, device=device, dtype=torch.float32) * 0.02
    direction = torch.randn(H, generator=gen, device=device, dtype=torch.float32)
    direction /= direction.norm()
    if skew > 0:  # a few hot experts: their router rows lean towards a direction every token shares
        hot = max(1, E // 16)
        gate[:hot] += 0.16 * skew * direction
    w1 = torch.randn(E, 2 * I, H, generator=gen, device=device, dtype=torch.float32) * H ** -0.5
    w2 = torch.randn(E, H, I, generator=gen, device=device, dtype=torch.float32) * I ** -0.5
    return (gate.to(dtype), w1.to(dtype), w2.to(dtype)), direction


def make_tokens(T, H, device, dtype, skew, direction, gen):
    x = torch.randn(T, H, generator=gen, device=device, dtype=torch.float32)
    if skew > 0:
        x += skew * direction * math.sqrt(H) * 0.25
    return x.to(dtype)


def routing_of(x, gate, k, norm):
    logits = F.linear(x, gate)
    p = torch.softmax(logits, dim=-1, dtype=torch.float32)
    w, ids = torch.topk(p, k, dim=-1)
    if norm:
        w = w / w.sum(-1, keepdim=True)
    return w.to(x.dtype), ids


def reference(x, weights, k, norm):
    """float64 block output with the routing decisions of the input dtype (bf16 logits → f32 softmax)."""
    gate, w1, w2 = weights
    w, ids = routing_of(x, gate, k, norm)
    xd, w1d, w2d = x.double(), w1.double(), w2.double()
    out = torch.zeros_like(xd)
    for j in range(k):
        e = ids[:, j]
        y1 = torch.einsum("th,tnh->tn", xd, w1d[e])
        g, u = y1.chunk(2, -1)
        y2 = torch.einsum("ti,thi->th", F.silu(g) * u, w2d[e])
        out += w[:, j].double().unsqueeze(-1) * y2
    return out


def rel_err(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def expert_load(x, gate, k):
    _, ids = routing_of(x, gate, k, True)
    counts = torch.bincount(ids.reshape(-1), minlength=gate.shape[0]).float()
    return (counts.max() / counts.mean()).item(), int((counts > 0).sum())


class Timer:
    """The median time of `repeats` synchronised steps after the warm-up; `last` holds the steps' 10th and 90th
    percentiles, with back_to_back the time per step of `repeats` more steps run without a synchronisation
    between them, and with a GPU meter the clock and power over the second half of the warm-up and the timed
    steps (the sustained state being measured).

    A synchronised step starts on an idle GPU, which waits for the host until the step's first kernel is
    launched (0.05-0.23 ms for fusedmoe at T=4096, varying with the host's speed from process to process;
    NOTES, session 23). Back to back the host runs ahead and the GPU's own time per step shows."""

    def __init__(self, device, warmup_ms=0.0, meter=None, back_to_back=False):
        self.cuda = device.type == "cuda"
        self.warmup_ms = warmup_ms
        self.meter = meter if meter is not None and meter.active else None
        self.back_to_back = back_to_back
        self.last: dict = {}

    def __call__(self, fn, warmup, repeats):
        window = Window(self.meter) if self.meter else None
        try:
            times, steps = self._run(fn, warmup, repeats, window)
            self.last = window.summary(steps + repeats) if window else {}
        finally:
            if window:
                window.close()  # (a step that raised leaves no thread reading the card)
        if self.back_to_back and repeats > 0:
            self.last["ms_back_to_back"] = self._back_to_back(fn, repeats)
        if len(times) >= 2:  # the spread of the timed steps, beside their median
            q = statistics.quantiles(times, n=10, method="inclusive")
            self.last.update(ms_p10=q[0], ms_p90=q[-1])
        return statistics.median(times)

    def _back_to_back(self, fn, repeats):
        """ms per step over `repeats` steps launched without a synchronisation between them."""
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(repeats):
                fn()
            b.record()
            b.synchronize()
            return a.elapsed_time(b) / repeats
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t0) * 1e3 / repeats

    def _run(self, fn, warmup, repeats, window):
        start = time.perf_counter()
        steps = 0
        # Steps of a sustained loop until both the step count and the time are reached (synchronised, so the
        # host clock measures the GPU's time); the cap keeps a tiny step's warm-up finite.
        while steps < warmup or (steps < 100_000 and (time.perf_counter() - start) * 1e3 < self.warmup_ms):
            fn()
            steps += 1
            if steps % 8 == 0:
                if self.cuda:
                    torch.cuda.synchronize()
                if window and (time.perf_counter() - start) * 1e3 >= self.warmup_ms / 2:
                    window.open(steps)  # its thread reads the card from here on
        if self.cuda:
            torch.cuda.synchronize()
        if window:
            window.open(steps)
        times = []
        for _ in range(repeats):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return times, steps


def copy_bandwidth(device):
    """Bytes read + written per second of a large device-to-device copy (the small-T floor's denominator)."""
    if device.type != "cuda":
        return None
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = Timer(device)(lambda: dst.copy_(src), 3, 10)
    return 2 * src.numel() / (ms * 1e-3)


def progress(i, n, label):
    if not sys.stderr.isatty():
        return
    width = 30
    done = int(width * i / max(n, 1))
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{n} {label:<48}")
    sys.stderr.flush()
    if i == n:
        sys.stderr.write("\n")


def machine_info(device):
    info = dict(python=platform.python_version(), torch=torch.__version__, fusedmoe=fusedmoe.__version__,
                platform=platform.platform())
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, sms=p.multi_processor_count, cuda=torch.version.cuda,
                    driver=_driver_version(), gpu_memory_gib=round(p.total_memory / 2 ** 30, 1))
    else:
        info.update(cpu=platform.processor() or platform.machine(), threads=os.cpu_count())
    return info


def _driver_version():
    try:
        import subprocess
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
    except Exception:  # noqa: BLE001
        return None


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="fusedmoe-bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(PRESETS), default=None,
                    help="shape preset (default: qwen3-30b-a3b on a GPU, tiny on the CPU)")
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--intermediate", type=int)
    ap.add_argument("--experts", type=int)
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--no-norm", action="store_true", help="norm_topk_prob=False")
    ap.add_argument("--tokens", type=int, nargs="+", help="token counts (default: 1..65536 in powers of two on a "
                    "GPU, 16..256 on the CPU)")
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd", "frozen"], choices=["fwd", "fwdbwd", "frozen"])
    ap.add_argument("--skew", type=float, default=0.0, help="route tokens towards a few hot experts (0: balanced)")
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--impls", nargs="+", default=None, help="implementations (default: all available)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=3, help="warm-up steps before timing (at least)")
    ap.add_argument("--no-meter", action="store_true",
                    help="do not read the card's clock and power through NVML (a thread does, during each "
                         "implementation's sustained loop)")
    ap.add_argument("--warmup-ms", type=float, default=None,
                    help="GPU: warm-up time before timing (at least; default 500, 50 with --quick), so every "
                         "implementation is timed in the card's sustained clocks (0: --warmup steps only)")
    ap.add_argument("--check-tokens", type=int, default=64, help="T of the correctness check before timing")
    ap.add_argument("--quick", action="store_true", help="a fast smoke run: few tokens and repeats")
    ap.add_argument("--out", default="bench-out", help="folder for bench.json and bench.png")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-autotune", action="store_true", help="fusedmoe with its shipped kernel heuristic instead "
                    "of the autotuned (disk-cached) kernel choices")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and fusedmoe.cuda_available() else "cpu"))
    if device.type == "cuda" and not fusedmoe.cuda_available():
        sys.exit("fusedmoe-bench: --device cuda, but fusedmoe sees no Hopper GPU")
    preset = PRESETS[args.model or ("qwen3-30b-a3b" if device.type == "cuda" else "tiny")]
    shape = Shape(args.hidden or preset["hidden"], args.intermediate or preset["intermediate"],
                  args.experts or preset["experts"], args.top_k or preset["top_k"])
    norm = not args.no_norm
    if args.quick:
        tokens = args.tokens or ([256, 2048] if device.type == "cuda" else [16, 64])
        repeats = args.repeats or 3
    else:
        tokens = args.tokens or ([2 ** i for i in range(17)] if device.type == "cuda" else [16, 64, 256])
        repeats = args.repeats or (20 if device.type == "cuda" else 3)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    if device.type == "cpu":
        dtype = torch.float32  # the CPU backend's fast path; bf16 matmuls on CPU are not the point here
    names = args.impls or (["fusedmoe", "torch_grouped_mm", "hf"] + transformers_experts_impls())
    gen = torch.Generator(device=device).manual_seed(args.seed)
    weights, direction = make_weights(shape, device, dtype, args.skew, gen)
    impls, skipped = build_impls(names, shape, weights, norm, device, dtype, autotune=not args.no_autotune)
    warmup_ms = args.warmup_ms if args.warmup_ms is not None else (
        0.0 if device.type == "cpu" else 50.0 if args.quick else 500.0)
    timer = Timer(device, warmup_ms, None if args.no_meter else GpuMeter(device), back_to_back=device.type == "cuda")

    # Correctness first, at a small T, against float64 with the same routing decisions.
    x_check = make_tokens(args.check_tokens, shape.H, device, dtype, args.skew, direction, gen)
    ref = reference(x_check, weights, shape.k, norm)
    checks = {}
    for name, fn in list(impls.items()):
        try:
            with torch.no_grad():
                out = fn(x_check)[0]
            err = rel_err(out, ref)
            ok = math.isfinite(err) and err < 2e-2
            checks[name] = dict(rel_err=err, ok=ok)
            if not ok:
                skipped[name] = f"WRONG: relative error {err:.3g} against the float64 reference"
                del impls[name]
        except Exception as e:  # noqa: BLE001
            skipped[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            del impls[name]

    bw = copy_bandwidth(device)
    rows = []
    jobs = [(T, mode) for T in tokens for mode in args.modes]
    n_jobs = len(jobs) * (len(impls) + 1)
    done = 0
    for T, mode in jobs:
        x = make_tokens(T, shape.H, device, dtype, args.skew, direction, gen)
        load, touched = expert_load(x, weights[0], shape.k)
        floor_ms = (touched * 3 * shape.H * shape.I * x.element_size()) / bw * 1e3 if bw else None
        candidates = dict(impls)
        candidates["dense_equivalent"] = DenseEquivalent(shape, T, device, dtype)
        for name, fn in candidates.items():
            progress(done, n_jobs, f"T={T} {mode} {name}")
            done += 1
            row = dict(impl=name, tokens=T, mode=mode, max_over_mean_load=load, experts_touched=touched)
            try:
                row.update(run_one(fn, x, mode, timer, args.warmup, repeats, device, shape))
                row["tflops"] = shape.flops(T, mode) / (row["ms"] * 1e-3) / 1e12
                row["weight_read_floor_ms"] = floor_ms
                if hasattr(fn, "block"):  # the kernel choices it ran with (forward, dX, dW; None: heuristic)
                    blk = fn.block
                    row["kernels"] = [c.tiling() if c is not None else None
                                      for c in blk.kernel_configs(x, blk.gate, blk.gate_up_proj, blk.down_proj)]
            except torch.cuda.OutOfMemoryError:
                row["error"] = "out of memory"
                torch.cuda.empty_cache()
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            rows.append(row)
        del candidates
    progress(n_jobs, n_jobs, "done")

    result = dict(machine=machine_info(device), shape=vars(shape), norm_topk_prob=norm, dtype=str(dtype),
                  skew=args.skew, repeats=repeats, warmup=args.warmup, warmup_ms=timer.warmup_ms,
                  copy_bandwidth_bytes_per_s=bw,
                  flops_formula="forward 6*T*k*H*I; backward 12*T*k*H*I (6 with frozen experts); router excluded",
                  checks=checks, skipped=skipped, results=rows)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.join(args.out, "bench.png"))
    print_table(result)
    print(f"\nJSON: {os.path.join(args.out, 'bench.json')}   plot: {os.path.join(args.out, 'bench.png')}")
    return 0


def run_one(fn, x, mode, timer, warmup, repeats, device, shape):
    params = getattr(fn, "params", None) or [p for p in getattr(fn, "parameters", lambda: [])()]
    experts = {id(p) for p in params if p.dim() == 3 or (p.dim() == 2 and p.shape[0] != shape.E)}
    for p in params:
        p.requires_grad_(mode != "fwd" and not (mode == "frozen" and id(p) in experts))
    if mode == "fwd":
        def step():
            with torch.no_grad():
                fn(x)
    else:
        xg = x.clone().requires_grad_()
        grad = torch.randn_like(fn(xg)[0])

        def step():
            out = fn(xg)[0]
            out.backward(grad)
            for p in params:
                p.grad = None
            xg.grad = None
    if device.type == "cuda":
        # The peak is a steady step's: the first call, which may run the autotune search (it times kernel choices
        # on buffers of its own), comes before the reset.
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    ms = timer(step, warmup, repeats)
    res = dict(ms=ms, **timer.last)
    if device.type == "cuda":
        res["peak_extra_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    return res


def print_table(result):
    rows = result["results"]
    m = result["machine"]
    print(f"\nfusedmoe-bench on {m.get('gpu') or m.get('cpu')} | torch {m['torch']} | transformers "
          f"{m['transformers']} | shape {result['shape']} | {result['dtype']} | skew {result['skew']}")
    print(f"FLOPs: {result['flops_formula']}")
    if "repeats" in result:
        print(f"Timing: median of {result['repeats']} steps after a warm-up of at least {result['warmup']} steps and "
              f"{result.get('warmup_ms', 0):g} ms")
    for name, why in result["skipped"].items():
        print(f"  skipped {name}: {why}")
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        print(f"\n[{mode}]  ms (TFLOP/s); ratio = torch_grouped_mm ms / fusedmoe ms")
        header = f"{'T':>7} {'load':>5} " + " ".join(f"{n[:20]:>22}" for n in impls) + f" {'ratio':>6}"
        print(header)
        for T in dict.fromkeys(r["tokens"] for r in rows):
            cells, by = [], {}
            sel = [r for r in rows if r["tokens"] == T and r["mode"] == mode]
            for n in impls:
                r = next((r for r in sel if r["impl"] == n), None)
                if r is None or "ms" not in r:
                    cells.append(f"{(r or {}).get('error', '-')[:22]:>22}")
                else:
                    by[n] = r["ms"]
                    cells.append(f"{r['ms']:>10.3f} ({r['tflops']:>7.1f})")
            ratio = by["torch_grouped_mm"] / by["fusedmoe"] if "fusedmoe" in by and "torch_grouped_mm" in by else float("nan")
            load = sel[0]["max_over_mean_load"] if sel else float("nan")
            print(f"{T:>7} {load:>5.2f} " + " ".join(cells) + f" {ratio:>6.2f}")
        print_back_to_back([r for r in rows if r["mode"] == mode], impls)
        print_peaks([r for r in rows if r["mode"] == mode], impls)
        print_power([r for r in rows if r["mode"] == mode], impls)


def print_back_to_back(rows, impls):
    """Per T, each implementation's ms per step when steps run back to back (CUDA runs): the GPU's own time,
    without the wait for the host at each synchronised step's start."""
    print_per_tokens(rows, impls, "ms per step back to back (no sync between steps)", "ms_back_to_back",
                     lambda r: f"{r['ms_back_to_back']:.3f}")


def print_peaks(rows, impls):
    """Per T, each implementation's peak device memory above what the step's inputs held (CUDA runs only)."""
    print_per_tokens(rows, impls, "peak MiB above the inputs", "peak_extra_mib",
                     lambda r: f"{r['peak_extra_mib']:.0f}")


def print_power(rows, impls):
    """Per T, each implementation's median SM clock, mean power and energy per step over its sustained loop
    (the warm-up's second half and the timed steps; CUDA runs where NVML reads the card)."""
    print_per_tokens(rows, impls, "SM clock, power, energy per step (*: at the power cap)", "sm_mhz",
                     lambda r: f"{r['sm_mhz']} MHz" + (f" {r['watts']:.0f} W {r['joules_per_step']:.2f} J"
                                                       if "watts" in r else "")
                     + ("*" if r.get("power_capped", 0) >= 0.5 else ""))


def print_per_tokens(rows, impls, title, key, cell):
    if not any(key in r for r in rows):
        return
    print(f"{'':>13} {title}")
    for T in dict.fromkeys(r["tokens"] for r in rows):
        cells = []
        for n in impls:
            r = next((r for r in rows if r["tokens"] == T and r["impl"] == n), None)
            cells.append(f"{cell(r):>22}" if r is not None and key in r else f"{'-':>22}")
        print(f"{T:>7} {'':>5} " + " ".join(cells))


def plot(result, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    rows = [r for r in result["results"] if "ms" in r]
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = plt.subplots(2, max(1, len(modes)), figsize=(5 * max(1, len(modes)), 8), squeeze=False)
    for c, mode in enumerate(modes):
        for impl in dict.fromkeys(r["impl"] for r in rows):
            sel = sorted((r for r in rows if r["mode"] == mode and r["impl"] == impl), key=lambda r: r["tokens"])
            if not sel:
                continue
            style = dict(linestyle="--", color="black") if impl == "dense_equivalent" else {}
            label = "dense equivalent (ceiling)" if impl == "dense_equivalent" else impl
            axes[0][c].plot([r["tokens"] for r in sel], [r["tflops"] for r in sel], marker="o", label=label, **style)
            axes[1][c].plot([r["tokens"] for r in sel], [r["ms"] for r in sel], marker="o", label=label, **style)
        axes[0][c].set_title(f"{mode}: TFLOP/s")
        axes[1][c].set_title(f"{mode}: ms")
        for r in (0, 1):
            axes[r][c].set_xscale("log", base=2)
            axes[r][c].set_xlabel("tokens")
            axes[r][c].grid(True, alpha=0.3)
        axes[1][c].set_yscale("log")
    axes[0][0].legend(fontsize=7)
    m = result["machine"]
    fig.suptitle(f"fusedmoe-bench: {m.get('gpu') or m.get('cpu')}, shape {result['shape']}, {result['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
