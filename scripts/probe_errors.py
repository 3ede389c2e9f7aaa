"""Probe: C++ errors raised through the extension must become ValueError, never crash (run with -X faulthandler)."""
import torch

from fusedmoe import _C

x = torch.randn(4, 32, dtype=torch.bfloat16)
logits = torch.empty(4, 8, dtype=torch.bfloat16)
for name, gate in [("cpu shape", torch.randn(8, 31, dtype=torch.bfloat16)),
                   ("cuda device", torch.randn(8, 32, dtype=torch.bfloat16, device="cuda"))]:
    try:
        _C.router_logits(x, gate, logits, 0)
        print(name, "NO ERROR (bad)")
    except ValueError as e:
        print(name, "ok:", e)
