"""Qwen3MoeFusedGroupedGEMMBlock: the Qwen3-MoE sparse MLP block as one nn.Module over fusedmoe."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor, nn

from . import _ops, functional
from . import autotune as _autotune
from .kernel_config import (FAMILIES, KernelConfigBackward_dW, KernelConfigBackward_dX, KernelConfigForward,
                            check_config, kernels_arg)


def _get(config, *names, default=None):
    for n in names:
        if hasattr(config, n):
            return getattr(config, n)
    return default


def activation_name(act_fn) -> Optional[str]:
    """'silu' for torch's and transformers' SiLU modules, else the module's class name (None for None)."""
    if act_fn is None:
        return None
    if isinstance(act_fn, nn.SiLU) or type(act_fn).__name__ in ("SiLUActivation", "SiLU"):
        return "silu"
    return type(act_fn).__name__


class Qwen3MoeFusedGroupedGEMMBlock(nn.Module):
    """hidden_states [B,S,H] → (hidden_states [B,S,H], router_logits [B·S,E]).

    config: an object with num_experts, num_experts_per_tok, norm_topk_prob, hidden_size,
    moe_intermediate_size and hidden_act (a transformers Qwen3MoeConfig, say).
    gate [E,H], gate_up_proj [E,2I,H] (gate rows first), down_proj [E,H,I]: tensors or nn.Parameters
    (Parameters are used as they are, so they stay shared with the module they came from).

    permute_x / permute_y: fuse the token gather into the first GEMM's loads and the scatter back to
    slot order into the second GEMM's stores (both on: the whole block runs as one fused op; otherwise
    the unfused steps run with explicit permutes). dX_only: expert weights get no gradient (no dW work
    or memory). dW_only: the input gets no gradient. Parameters with requires_grad=False also cost no
    gradient work.

    Kernel choices (CUDA; see fusedmoe.kernel_config): a kernel_config_* object selects its family's kernel
    and tile explicitly. Families left None follow the shipped heuristic, or with autotune=True the fastest
    choice found for this problem (GPU, shapes, power-of-two token bucket, dtype), searched on the first call
    and cached on disk for every later process (fusedmoe.autotune).
    """

    def __init__(self, config, gate: Tensor, gate_up_proj: Tensor, down_proj: Tensor, permute_x: bool = True,
                 permute_y: bool = True, autotune: bool = True,
                 kernel_config_fwd: Optional[KernelConfigForward] = None,
                 kernel_config_bwd_dW: Optional[KernelConfigBackward_dW] = None,
                 kernel_config_bwd_dX: Optional[KernelConfigBackward_dX] = None, dW_only: bool = False,
                 dX_only: bool = False):
        super().__init__()
        self.num_experts = int(_get(config, "num_experts", "num_local_experts"))
        self.top_k = int(_get(config, "num_experts_per_tok", "top_k"))
        self.norm_topk_prob = bool(_get(config, "norm_topk_prob", default=False))
        self.hidden_size = int(_get(config, "hidden_size"))
        self.intermediate_size = int(_get(config, "moe_intermediate_size", "intermediate_size"))
        act = _get(config, "hidden_act", default="silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"fusedmoe: hidden_act must be 'silu' (SiLU·mul experts), got {act!r}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"fusedmoe: num_experts_per_tok must be in [1, {self.num_experts}], got {self.top_k}")
        if dW_only and dX_only:
            raise ValueError("fusedmoe: dW_only and dX_only exclude each other")
        E, H, I = self.num_experts, self.hidden_size, self.intermediate_size
        for name, t, shape in (("gate", gate, (E, H)), ("gate_up_proj", gate_up_proj, (E, 2 * I, H)),
                               ("down_proj", down_proj, (E, H, I))):
            if not isinstance(t, Tensor):
                raise TypeError(f"fusedmoe: {name} must be a tensor, got {type(t).__name__}")
            if tuple(t.shape) != shape:
                raise ValueError(f"fusedmoe: {name} expected shape {shape} from the config, got {tuple(t.shape)}")
        if not (gate.dtype == gate_up_proj.dtype == down_proj.dtype):
            raise ValueError(f"fusedmoe: gate, gate_up_proj and down_proj must share a dtype, got "
                             f"{gate.dtype}, {gate_up_proj.dtype}, {down_proj.dtype}")
        self.gate = gate if isinstance(gate, nn.Parameter) else nn.Parameter(gate)
        self.gate_up_proj = gate_up_proj if isinstance(gate_up_proj, nn.Parameter) else nn.Parameter(gate_up_proj)
        self.down_proj = down_proj if isinstance(down_proj, nn.Parameter) else nn.Parameter(down_proj)
        self.permute_x, self.permute_y = bool(permute_x), bool(permute_y)
        self.autotune = bool(autotune)
        self.kernel_config_fwd = check_config(kernel_config_fwd, KernelConfigForward, "kernel_config_fwd")
        self.kernel_config_bwd_dX = check_config(kernel_config_bwd_dX, KernelConfigBackward_dX, "kernel_config_bwd_dX")
        self.kernel_config_bwd_dW = check_config(kernel_config_bwd_dW, KernelConfigBackward_dW, "kernel_config_bwd_dW")
        self.dW_only, self.dX_only = bool(dW_only), bool(dX_only)
        self._resolved_configs = {}  # (device, token bucket, dW needed, explicit configs) -> (configs, kernels)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, top_k={self.top_k}, hidden={self.hidden_size}, "
                f"intermediate={self.intermediate_size}, norm_topk_prob={self.norm_topk_prob}, "
                f"permute_x={self.permute_x}, permute_y={self.permute_y}")

    def forward(self, hidden_states: Tensor):
        gate = self.gate  # (each parameter looked up once: a module attribute costs microseconds of host time)
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"fusedmoe: hidden_states must be [B, S, {self.hidden_size}], got "
                             f"{tuple(hidden_states.shape)}")
        if hidden_states.device != gate.device:
            raise ValueError(f"fusedmoe: hidden_states are on {hidden_states.device}, the block's parameters on "
                             f"{gate.device}; move one of them")
        if hidden_states.dtype != gate.dtype:
            raise ValueError(f"fusedmoe: hidden_states dtype {hidden_states.dtype} does not match the block's "
                             f"parameters ({gate.dtype}); cast one of them")
        B, S, H = hidden_states.shape
        x = hidden_states.reshape(B * S, H).contiguous()
        if self.dW_only:
            x = x.detach()
        w1, w2 = self.gate_up_proj, self.down_proj
        if self.dX_only:
            w1, w2 = w1.detach(), w2.detach()
        if self.permute_x and self.permute_y:
            kernels = self.kernels_for(x, gate, w1, w2)
            out, logits = _ops.moe_block(x, gate, w1, w2, self.top_k, self.norm_topk_prob, kernels)
        else:
            out, logits = self._unfused(x, w1, w2)
        return out.view(B, S, H), logits

    def kernel_configs(self, x: Tensor, gate: Tensor, w1: Tensor, w2: Tensor) -> tuple:
        """(forward, dX, dW) configs for input x: the explicit ones, else the autotuned ones (None: heuristic)."""
        return self._resolve(x, gate, w1, w2)[0]

    def kernels_for(self, x: Tensor, gate: Tensor, w1: Tensor, w2: Tensor) -> list:
        """The ops' `kernels` argument for input x (see kernel_configs)."""
        return list(self._resolve(x, gate, w1, w2)[1])  # (a copy: the memo keeps its own)

    def _resolve(self, x: Tensor, gate: Tensor, w1: Tensor, w2: Tensor) -> tuple:
        """(kernel_configs, kernels_for) of input x."""
        explicit = (self.kernel_config_fwd, self.kernel_config_bwd_dX, self.kernel_config_bwd_dW)
        # Under torch.compile the lookup (a file, a lock) cannot be traced: compiled graphs take the explicit
        # configs and the heuristic.
        if (_ops.compiling() or not self.autotune or x.device.type != "cuda"
                or all(c is not None for c in explicit)):
            return explicit, kernels_arg(*explicit)
        with_dw = w1.requires_grad or w2.requires_grad
        # Resolved once per device, token bucket and dW need: later calls cost one dict lookup.
        memo_key = (x.device, _autotune.token_bucket(x.shape[0]), with_dw, explicit)
        resolved = self._resolved_configs.get(memo_key)
        if resolved is not None:
            return resolved
        tuned = _autotune.tuned_choice(x, gate, w1, w2, self.top_k, self.norm_topk_prob, with_dw)
        configs = tuple(c if c is not None else (cls.from_tiling(tuned[name]) if tuned and tuned.get(name) else None)
                        for c, (name, cls) in zip(explicit, FAMILIES))
        resolved = (configs, kernels_arg(*configs))
        if tuned is not None:  # (no entry yet, e.g. while a CUDA graph is captured: look again next call)
            self._resolved_configs[memo_key] = resolved
        return resolved

    def _unfused(self, x: Tensor, w1: Tensor, w2: Tensor):
        """The same function in separate steps, with explicit permutes where a fusion is switched off."""
        logits, weights, ids = functional.route(x, self.gate, self.top_k, self.norm_topk_prob)
        gather, m_sizes, _ = functional.sort_by_expert(ids, self.num_experts)
        k = self.top_k
        gather_l = gather.long()
        fwd, dx, dw = self.kernel_configs(x, self.gate, w1, w2)
        kw = dict(kernel_config_fwd=fwd, kernel_config_bwd_dX=dx, kernel_config_bwd_dW=dw)
        if self.permute_x:
            y1 = functional.grouped_gemm(x, w1, m_sizes, k, gather, permute_x=True, **kw)
        else:
            y1 = functional.grouped_gemm(x[gather_l // k], w1, m_sizes, k, gather, **kw)
        g, u = y1.chunk(2, dim=-1)
        act = nn.functional.silu(g) * u
        if self.permute_y:
            y2 = functional.grouped_gemm(act, w2, m_sizes, k, gather, permute_y=True, is_first_gemm=False, **kw)
        else:
            y2_expert = functional.grouped_gemm(act, w2, m_sizes, k, gather, is_first_gemm=False, **kw)
            y2 = torch.empty_like(y2_expert).index_copy(0, gather_l, y2_expert)
        T = x.shape[0]
        out = (y2.view(T, k, -1).float() * weights.float().unsqueeze(-1)).sum(1).to(x.dtype)
        return out, logits

    # ------------------------------------------------------------------ transformers

    @classmethod
    def from_hf(cls, moe_block: nn.Module, **kwargs) -> "Qwen3MoeFusedGroupedGEMMBlock":
        """Builds the block from a transformers Qwen3-MoE sparse block.

        transformers 5.x (fused `experts.gate_up_proj [E,2I,H]`, `experts.down_proj [E,H,I]`, router
        `gate.weight [E,H]`): the parameters are shared, not copied. transformers 4.x (`gate` an
        nn.Linear(H, E), `experts` a ModuleList of gate_proj/up_proj/down_proj MLPs): the expert weights
        are stacked into new parameters."""
        gate_mod = getattr(moe_block, "gate", None)
        experts = getattr(moe_block, "experts", None)
        if gate_mod is None or experts is None:
            raise TypeError(f"fusedmoe.from_hf: expected a Qwen3-MoE sparse block with .gate and .experts, got "
                            f"{type(moe_block).__name__}")
        config = getattr(experts, "config", None) or getattr(moe_block, "config", None)
        if hasattr(experts, "gate_up_proj") and hasattr(experts, "down_proj"):  # transformers 5.x
            gate = gate_mod.weight
            w1, w2 = experts.gate_up_proj, experts.down_proj
            E, two_i, H = w1.shape
            top_k = getattr(gate_mod, "top_k", None) or _get(config, "num_experts_per_tok")
            norm = getattr(gate_mod, "norm_topk_prob", None)
            act_fn = getattr(experts, "act_fn", None)
        elif isinstance(experts, nn.ModuleList):  # transformers 4.x
            gate = gate_mod.weight
            E = len(experts)
            with torch.no_grad():
                w1 = nn.Parameter(torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight], 0) for e in experts]))
                w2 = nn.Parameter(torch.stack([e.down_proj.weight for e in experts]))
            w1.requires_grad_(experts[0].gate_proj.weight.requires_grad)
            w2.requires_grad_(experts[0].down_proj.weight.requires_grad)
            _, two_i, H = w1.shape
            top_k = getattr(moe_block, "top_k", None) or _get(config, "num_experts_per_tok")
            norm = getattr(moe_block, "norm_topk_prob", None)
            act_fn = getattr(experts[0], "act_fn", None)
        else:
            raise TypeError("fusedmoe.from_hf: unrecognised experts layout "
                            f"{type(experts).__name__} (expected fused 3-D weights or a ModuleList of MLPs)")
        if norm is None:
            norm = _get(config, "norm_topk_prob", default=False)
        act = _get(config, "hidden_act", default=None)
        if act is None:
            act = activation_name(act_fn) or "silu"
        if top_k is None:
            raise ValueError("fusedmoe.from_hf: cannot find num_experts_per_tok on the block or its config")
        cfg = SimpleNamespace(num_experts=E, num_experts_per_tok=int(top_k), norm_topk_prob=bool(norm),
                              hidden_size=H, moe_intermediate_size=two_i // 2, hidden_act=act)
        return cls(cfg, gate, w1, w2, **kwargs)
