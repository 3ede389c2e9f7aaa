#!/usr/bin/env python3
"""Per-kernel table of an A/B's steady-state runs (the `== TREE, round R, steady kernels` blocks that
scripts/gpu_ab_bench.sh writes with AB_STEADY_TOKENS): for each T and kernel, every tree's µs per step in every
round, and each tree's change against the old tree, both raw and divided by a control kernel's change (a kernel
that the change under test does not touch: the clocks drift within a GPU call, and the control drifts with them).

    python3 scripts/ab_steady_table.py ab_bench.txt [--control 'gemm_sm90<__nv_bfloat16,256,0,true,2>']
"""
import argparse
import re
import statistics
from collections import defaultdict


def parse(path):
    """{(T, mode): {tree: {round: {kernel: µs per step}}}} from the fusedmoe rows (gap rows left out)."""
    runs = defaultdict(lambda: defaultdict(dict))  # (T, mode) -> tree -> round -> {kernel: us}
    tree = rnd = key = None
    in_ours = False
    for line in open(path, encoding="utf-8"):
        m = re.match(r"== (\S+), round (\d+), steady kernels", line)
        if m:
            tree, rnd, key, in_ours = m.group(1), int(m.group(2)), None, False
            continue
        if line.startswith("=="):
            tree = None
            continue
        if tree is None:
            continue
        m = re.match(r"T=(\d+) (\w+):", line)
        if m:
            key = (int(m.group(1)), m.group(2))
            continue
        m = re.match(r"  (\S+)\s+[0-9.]+ /", line)
        if m:
            in_ours = m.group(1) == "fusedmoe"
            continue
        m = re.match(r"\s+([0-9.]+) µs\s+x\s*([0-9.]+)\s+(.+)$", line)
        if m and in_ours and key and " -> " not in m.group(3):
            runs[key][tree].setdefault(rnd, {})[m.group(3).strip()] = float(m.group(1))
    return runs


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log")
    ap.add_argument("--control", default="gemm_sm90<__nv_bfloat16,256,0,true,2>",
                    help="a kernel the change does not touch (default: the forward's GEMM1)")
    ap.add_argument("--min-us", type=float, default=20.0, help="leave out kernels below this time")
    args = ap.parse_args()
    for (T, mode), trees in sorted(parse(args.log).items()):
        if "old" not in trees:
            continue
        old = trees["old"]
        print(f"\nT={T} {mode}: µs per step by round; change against old, raw / divided by the control's change")
        kernels = sorted({k for rounds in old.values() for k, us in rounds.items() if us >= args.min_us},
                         key=lambda k: -statistics.mean(r.get(k, 0.0) for r in old.values()))
        for tree, rounds in trees.items():
            if tree == "old":
                continue
            print(f"  {tree} against old")
            for k in kernels:
                pairs = [(old[r][k], rounds[r][k], old[r].get(args.control), rounds[r].get(args.control))
                         for r in sorted(rounds) if r in old and k in old[r] and k in rounds[r]]
                if not pairs:
                    continue
                raw = [n / o - 1 for o, n, _, _ in pairs]
                norm = [(n / o) / (cn / co) - 1 for o, n, co, cn in pairs if co and cn]
                times = "  ".join(f"{o:7.1f}>{n:7.1f}" for o, n, _, _ in pairs)
                mark = "  (control)" if k == args.control else ""
                print(f"    {k[:44]:44} {times}   raw {statistics.mean(raw):+6.2%}"
                      + (f"  norm {statistics.mean(norm):+6.2%} [{min(norm):+.2%} .. {max(norm):+.2%}]"
                         if norm else "") + mark)


if __name__ == "__main__":
    main()
