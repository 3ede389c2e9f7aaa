"""cProfile of fusedmoe block forward calls (host side) at T tokens: python scripts/host_profile.py [T]."""
import cProfile
import pstats
import sys
from types import SimpleNamespace

import torch

import fusedmoe
from fusedmoe.bench import PRESETS, Shape, make_weights

T = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
p = PRESETS["qwen3-30b-a3b"]
shape = Shape(p["hidden"], p["intermediate"], p["experts"], p["top_k"])
dev = torch.device("cuda")
(gate, w1, w2), _ = make_weights(shape, dev, torch.bfloat16, 0.0, torch.Generator(device=dev).manual_seed(0))
cfg = SimpleNamespace(num_experts=shape.E, num_experts_per_tok=shape.k, hidden_size=shape.H,
                      moe_intermediate_size=shape.I, norm_topk_prob=True)
block = fusedmoe.Qwen3MoeFusedGroupedGEMMBlock(cfg, gate, w1, w2, autotune=False)
x = torch.randn(1, T, shape.H, device=dev, dtype=torch.bfloat16)
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
