"""The functional API: routing helpers and the grouped GEMM building block (the reference design's
`grouped_gemm`), all differentiable where it makes sense."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _ops
from .kernel_config import (KernelConfigBackward_dW, KernelConfigBackward_dX, KernelConfigForward, check_config,
                            kernels_arg)


def route(x: Tensor, gate: Tensor, top_k: int, norm_topk_prob: bool = True):
    """Router: logits = x·gateᵀ, float32 softmax, top-k, optional renormalisation.

    Returns (router_logits [T,E], topk_weights [T,k] in x's dtype, topk_ids [T,k] int32), differentiable
    in x and gate through both the logits and the weights."""
    _check_2d("x", x)
    _check_2d("gate", gate)
    return _ops.route(x, gate, top_k, norm_topk_prob)


def sort_by_expert(topk_ids: Tensor, num_experts: int):
    """Stable sort of the flat slots by expert: (gather_indices [T·k], m_sizes [E], expert_offsets [E+1])."""
    if topk_ids.dtype != torch.int32:
        topk_ids = topk_ids.to(torch.int32)
    return _ops.sort_by_expert(topk_ids.contiguous(), num_experts)


def grouped_gemm(X: Tensor, W: Tensor, m_sizes: Tensor, topk: int, gather_indices: Optional[Tensor] = None,
                 permute_x: bool = False, permute_y: bool = False, topk_weights: Optional[Tensor] = None,
                 fuse_mul_post: bool = False, kernel_config_fwd: Optional[KernelConfigForward] = None,
                 kernel_config_bwd_dX: Optional[KernelConfigBackward_dX] = None,
                 kernel_config_bwd_dW: Optional[KernelConfigBackward_dW] = None, autotune: bool = False,
                 is_first_gemm: bool = True, dX_only: bool = False, dW_only: bool = False) -> Tensor:
    """Y[out_row(i)] = X[in_row(i)] · W[e(i)]ᵀ over the rows of each expert (DESIGN.md §3).

    X: [T, K] with permute_x (rows gathered by gather_indices // topk), else [T·topk, K] in expert order.
    W: [E, N, K]. m_sizes: [E] rows per expert. With permute_y the output rows land in slot order
    (row gather_indices[i]); otherwise in expert order. fuse_mul_post multiplies each output row by its
    slot's topk_weights (inference only). dX_only / dW_only skip the other gradient entirely.
    permute_x belongs to the first GEMM and permute_y to the second (is_first_gemm says which this is).
    kernel_config_fwd / _bwd_dX / _bwd_dW select the kernels of this product and its two gradients (None: the
    heuristic). autotune is accepted for the reference design's signature; the search runs at block level
    (Qwen3MoeFusedGroupedGEMMBlock, fusedmoe.autotune), so here it changes nothing.
    """
    _check_2d("X", X)
    if W.dim() != 3:
        raise ValueError(f"fusedmoe.grouped_gemm: W must be [E, N, K], got shape {tuple(W.shape)}")
    if m_sizes.dim() != 1 or m_sizes.shape[0] != W.shape[0]:
        raise ValueError(f"fusedmoe.grouped_gemm: m_sizes must be [E={W.shape[0]}], got {tuple(m_sizes.shape)}")
    if permute_x and not is_first_gemm:
        raise ValueError("fusedmoe.grouped_gemm: permute_x (gathering token rows) applies to the first GEMM only")
    if permute_y and is_first_gemm:
        raise ValueError("fusedmoe.grouped_gemm: permute_y (scattering to slot order) applies to the second GEMM only")
    if (permute_x or permute_y or fuse_mul_post) and gather_indices is None:
        raise ValueError("fusedmoe.grouped_gemm: permute_x, permute_y and fuse_mul_post need gather_indices")
    if dX_only and dW_only:
        raise ValueError("fusedmoe.grouped_gemm: dX_only and dW_only exclude each other")
    check_config(kernel_config_fwd, KernelConfigForward, "kernel_config_fwd")
    check_config(kernel_config_bwd_dX, KernelConfigBackward_dX, "kernel_config_bwd_dX")
    check_config(kernel_config_bwd_dW, KernelConfigBackward_dW, "kernel_config_bwd_dW")
    row_weights = None
    if fuse_mul_post:
        if topk_weights is None:
            raise ValueError("fusedmoe.grouped_gemm: fuse_mul_post needs topk_weights")
        if torch.is_grad_enabled() and (X.requires_grad or W.requires_grad or topk_weights.requires_grad):
            raise ValueError("fusedmoe.grouped_gemm: fuse_mul_post is inference-only (no backward); "
                             "run it under torch.no_grad()")
        row_weights = topk_weights.reshape(-1).to(X.dtype).contiguous()
    offsets = torch.nn.functional.pad(torch.cumsum(m_sizes, 0, dtype=torch.int32), (1, 0))
    gather = gather_indices.to(torch.int32).contiguous() if gather_indices is not None else None
    if dX_only:
        W = W.detach()
    if dW_only:
        X = X.detach()
    kernels = kernels_arg(kernel_config_fwd, kernel_config_bwd_dX, kernel_config_bwd_dW)
    return _ops.grouped_gemm_op(X, W, offsets, gather, topk, permute_x, permute_y, row_weights, kernels)


def _check_2d(name: str, t: Tensor):
    if not isinstance(t, Tensor):
        raise TypeError(f"fusedmoe: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"fusedmoe: {name} must be 2-D, got shape {tuple(t.shape)}")
