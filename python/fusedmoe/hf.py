"""transformers integration: patch a loaded model's Qwen3-MoE blocks, and the "fusedmoe" experts
implementation for `from_pretrained(..., experts_implementation="fusedmoe")`."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import _ops
from .block import Qwen3MoeFusedGroupedGEMMBlock, activation_name

EXPERTS_IMPLEMENTATION = "fusedmoe"


def experts_forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """transformers' experts interface: fn(experts_module, hidden [T,H], top_k_index [T,k], top_k_weights [T,k]).

    The routing comes from transformers' router; fusedmoe sorts, runs both grouped GEMMs with the gather,
    SiLU·mul, scatter and weighted combine fused, with autograd for hidden states, routing weights and
    both expert weights."""
    act = getattr(getattr(self, "config", None), "hidden_act", None) or activation_name(getattr(self, "act_fn", None))
    if act not in ("silu", "swish"):
        raise ValueError(f"fusedmoe experts: the activation must be SiLU, got {act!r}")
    if getattr(self, "has_bias", False) or not getattr(self, "is_concatenated", True) or getattr(self, "is_transposed", False):
        raise ValueError("fusedmoe experts: needs concatenated [gate; up] weights without bias, not transposed")
    ids = top_k_index.to(torch.int32).contiguous()
    weights = top_k_weights.contiguous()
    return _ops.experts(hidden_states.contiguous(), weights, ids, self.gate_up_proj, self.down_proj, [])[0]


def register_experts_implementation() -> bool:
    """Registers "fusedmoe" with transformers' experts interface; False when transformers lacks one."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:
        return False
    ExpertsInterface.register(EXPERTS_IMPLEMENTATION, experts_forward)
    return True


class FusedSparseMoeBlock(nn.Module):
    """Drop-in for a transformers Qwen3-MoE sparse block: keeps its `gate` and `experts` submodules (so
    state-dict keys and parameters stay the same) and runs the whole block through fusedmoe.

    Returns what the replaced block returned: the hidden states (transformers 5.x) or
    (hidden states, router logits) (transformers 4.x)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.fused = Qwen3MoeFusedGroupedGEMMBlock.from_hf(block)
        self.returns_router_logits = isinstance(getattr(block, "experts", None), nn.ModuleList)
        if not self.returns_router_logits:  # 5.x: share the submodules, so the model's parameters stay in place
            self.gate, self.experts = block.gate, block.experts
            del self.fused._parameters["gate"], self.fused._parameters["gate_up_proj"], self.fused._parameters["down_proj"]

    def forward(self, hidden_states: Tensor):
        f = self.fused
        if self.returns_router_logits:
            return f(hidden_states)
        B, S, H = hidden_states.shape
        x = hidden_states.reshape(B * S, H).contiguous()
        w1, w2 = self.experts.gate_up_proj, self.experts.down_proj
        out = _ops.moe_block(x, self.gate.weight, w1, w2, f.top_k, f.norm_topk_prob,
                             f.kernels_for(x, self.gate.weight, w1, w2))[0]
        return out.view(B, S, H)


def _is_qwen3_moe_block(m: nn.Module) -> bool:
    name = type(m).__name__
    return name.endswith("SparseMoeBlock") and "Moe" in name and hasattr(m, "gate") and hasattr(m, "experts")


def patch_model(model: nn.Module) -> int:
    """Replaces every Qwen3-MoE sparse block of `model` in place by a fusedmoe block; returns the count.

    transformers 5.x blocks keep their parameters (shared); 4.x blocks get stacked copies of their expert
    weights. Router logits recorded by transformers' output hooks are not produced by patched 5.x blocks;
    use experts_implementation="fusedmoe" (which keeps transformers' router) when they are needed."""
    targets = [(name, m) for name, m in model.named_modules() if _is_qwen3_moe_block(m)]
    for name, block in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FusedSparseMoeBlock(block))
    return len(targets)
