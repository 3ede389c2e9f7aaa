"""Each GEMM family's kernel choices timed at the bench's steady state (500 ms of back-to-back steps first, as
`fusedmoe.bench` times), one family at a time with the others on the shipped heuristic, rounds interleaved.
The autotuner times its choices in short loops on a cool card; this says whether the heuristic's choice still
wins once the card sits at its power limit. Qwen3-30B-A3B, bf16, the bench's weights and tokens.
    python scripts/steady_configs.py [T ...] [--rounds N] [--modes fwd fwdbwd]
(the token counts first: after --modes they would be read as more modes)"""
import argparse

import torch

import fusedmoe
from fusedmoe.bench import PRESETS, Shape, Timer, make_tokens, make_weights
from fusedmoe.kernel_config import FAMILIES
from host_overhead import step_of  # this folder: a step as the bench runs it


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("tokens", nargs="*", type=int, default=[4096])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=["fwdbwd"], choices=["fwd", "fwdbwd"])
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    p = PRESETS["qwen3-30b-a3b"]
    shape = Shape(p["hidden"], p["intermediate"], p["experts"], p["top_k"])
    gen = torch.Generator(device=dev).manual_seed(0)
    (gate, w1, w2), direction = make_weights(shape, dev, dt, 0.0, gen)
    cfg = type("Cfg", (), dict(num_experts=shape.E, num_experts_per_tok=shape.k, norm_topk_prob=True,
                               hidden_size=shape.H, moe_intermediate_size=shape.I, hidden_act="silu"))
    # The heuristic, then every other choice of one family at a time.
    variants = [("heuristic", {})]
    for family, cls in FAMILIES:
        for c in cls.search_space():
            variants.append((f"{family} BN={c.BLOCK_SIZE_N} cluster={c.cluster_m}", {f"kernel_config_{family}": c}))
    timer = Timer(dev, warmup_ms=500.0)
    print(f"{torch.cuda.get_device_name()}; median ms of 20 steps after 500 ms of back-to-back steps")
    for T in args.tokens:
        x = make_tokens(T, shape.H, dev, dt, 0.0, direction, gen)
        for mode in args.modes:
            todo = [v for v in variants if mode == "fwdbwd" or not v[0].startswith("bwd")]
            times = {name: [] for name, _ in todo}
            for _ in range(args.rounds):
                for name, kw in todo:
                    blk = fusedmoe.Qwen3MoeFusedGroupedGEMMBlock(
                        cfg, torch.nn.Parameter(gate.clone()), torch.nn.Parameter(w1.clone()),
                        torch.nn.Parameter(w2.clone()), autotune=False, **kw)

                    def fn(tokens, blk=blk):
                        return blk(tokens.unsqueeze(0))
                    fn.params = list(blk.parameters())
                    times[name].append(timer(step_of(fn, x, mode == "fwdbwd"), 3, 20))
                    del blk, fn
            base = min(times["heuristic"])
            print(f"T={T} {mode}:")
            for name, ts in times.items():
                print(f"  {name:<34} " + " ".join(f"{t:7.3f}" for t in ts) + f"   best/heuristic's {min(ts) / base:.3f}")


if __name__ == "__main__":
    main()
