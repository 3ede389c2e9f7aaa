"""Why a forward+backward step of the bench takes longer than moe_example's forward plus backward: the fusedmoe block
at the bench's shapes and inputs, timed in loops of forward-only (training forward, state kept), backward-only (the
same graph, retained) and forward+backward steps, each both as synchronised steps (the bench's Timer: CUDA events,
median) and back to back (one pair of events over the loop), with the SM clock and board power sampled by nvidia-smi
during each loop. If backward-only plus forward-only match moe_example but forward+backward does not, the kernels
slow each other down when interleaved (clock, power, caches); if the loops alone are already slower, the bench's
inputs or allocations are. The dense equivalent's forward+backward loop shows the clock cuBLAS runs at meanwhile.
    python scripts/step_split.py [T ...]   (default 16384)"""
import statistics
import subprocess
import sys
import time

import torch

from fusedmoe.bench import DenseEquivalent, Timer
from host_overhead import make_impls, step_of  # this folder: the bench's impls and steps

STEPS = 30


REASONS = "clocks_event_reasons.active"  # why the clock is below its maximum (a bit mask; see nvidia-smi -q)


def sampled(label, fn):
    """Runs fn() with nvidia-smi sampling the SM clock, power and clock-limit reasons every 20 ms; prints their
    medians and the most frequent reason mask (0x4 software power cap, 0x8 hardware slowdown, 0x20 / 0x40 software /
    hardware thermal, 0x80 power brake)."""
    smi = subprocess.Popen(["nvidia-smi", f"--query-gpu=clocks.sm,power.draw,{REASONS}",
                            "--format=csv,noheader,nounits", "-lms", "20"], stdout=subprocess.PIPE, text=True)
    time.sleep(0.1)
    try:
        result = fn()
    finally:
        smi.terminate()
    rows = [line.split(", ") for line in smi.communicate()[0].splitlines() if line.count(",") == 2]
    busy = [r for r in rows if r[1].replace(".", "").isdigit() and float(r[1]) > 250]  # while the GPU works
    clock = statistics.median(float(r[0]) for r in busy) if busy else float("nan")
    power = statistics.median(float(r[1]) for r in busy) if busy else float("nan")
    reason = statistics.mode(r[2].strip() for r in busy) if busy else "-"
    print(f"  {label:<34} {result}  (SM clock median {clock:.0f} MHz, power {power:.0f} W, reasons {reason}, "
          f"{len(busy)} samples)")


def loops(step):
    """(synchronised median ms, back-to-back ms per step) over STEPS steps after a warm-up."""
    timer = Timer(torch.device("cuda"), back_to_back=True)
    synced = timer(step, 5, STEPS)
    return f"synchronised {synced:7.3f} ms, back to back {timer.last['ms_back_to_back']:7.3f} ms"


def main():
    tokens = [int(a) for a in sys.argv[1:]] or [16384]
    dev, dt = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    impls, shape = make_impls(dev, dt, gen, autotune=False, grouped_mm=False)
    fn = impls["fusedmoe"]
    print(f"{torch.cuda.get_device_name()}; {STEPS} steps per loop")
    for T in tokens:
        x = torch.randn(T, shape.H, device=dev, dtype=dt, generator=gen)
        forward_inference = step_of(fn, x, backward=False)
        forward_backward = step_of(fn, x, backward=True)  # (its parameters now require grad)
        xg = x.clone().requires_grad_()
        kept = fn(xg)[0]
        grad = torch.randn_like(kept)

        def forward_train():
            fn(xg)

        def backward_only():
            kept.backward(grad, retain_graph=True)
            for q in fn.params:
                q.grad = None
            xg.grad = None

        dense = DenseEquivalent(shape, T, dev, dt)
        dense.params = list(dense.parameters())

        print(f"T={T}:")
        for label, step in (("forward (inference, no_grad)", forward_inference), ("forward (training, state kept)",
                            forward_train), ("backward only (retained graph)", backward_only),
                            ("forward+backward", forward_backward),
                            ("dense equivalent forward+backward", step_of(dense, x, backward=True))):
            sampled(label, lambda: loops(step))
        del kept, dense


if __name__ == "__main__":
    main()
