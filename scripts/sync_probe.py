"""Does anything early in a synchronised step change the step's GPU time? (session 27: the host_overhead Timeline's
synchronised steps, which record events inside the block, measured 0.26 ms less than the bench Timer's at T=4096
forward+backward.) Times the bench's Timer on the fusedmoe block, three rounds with the variants interleaved, with
the block's forward (a) as is, (b) recording a CUDA event at its start, (c) launching a one-element fill at its start.
    python scripts/sync_probe.py [T ...]"""
import statistics
import sys

import torch

import fusedmoe
from fusedmoe.bench import Timer
from host_overhead import make_impls, step_of


def main():
    Ts = [int(a) for a in sys.argv[1:]] or [2048, 4096]
    dev, dt = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    impls, shape = make_impls(dev, dt, gen, False, False)
    fn = impls["fusedmoe"]
    ops = fusedmoe._ops
    plain = ops._moe_block_eager
    poke = torch.zeros(1, device=dev)

    def with_event(*args):
        torch.cuda.Event().record()
        return plain(*args)

    def with_fill(*args):
        poke.fill_(1.0)
        return plain(*args)

    variants = {"plain": plain, "event at the forward's start": with_event, "fill kernel at the forward's start": with_fill}
    for T in Ts:
        x = torch.randn(T, shape.H, device=dev, dtype=dt, generator=gen)
        for backward in (False, True):
            step = step_of(fn, x, backward)
            res = {name: [] for name in variants}
            for _ in range(3):
                for name, impl in variants.items():
                    ops._moe_block_eager = impl
                    timer = Timer(dev, warmup_ms=200, back_to_back=True)
                    res[name].append((timer(step, 5, 30), timer.last["ms_back_to_back"]))
            ops._moe_block_eager = plain
            mode = "fwd+bwd" if backward else "fwd"
            for name, r in res.items():
                print(f"T={T} {mode:7} {name:36}: synchronised median ms " +
                      " ".join(f"{s:.3f}" for s, _ in r) + "   back to back " + " ".join(f"{b:.3f}" for _, b in r))


if __name__ == "__main__":
    main()
