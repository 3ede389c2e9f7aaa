"""torch.library custom ops over the C++ core, with fake (meta) implementations and autograd.

Every op allocates its outputs with torch, passes DLPack views and the current CUDA stream to the
extension, and never synchronises: the ops run under torch.compile(fullgraph=True) and CUDA graphs.

The whole block also has an eager path (`moe_block`): outside torch.compile it runs the same kernels
through a torch.autograd.Function instead of the dispatcher, because a block call's host time sits in front
of its first kernel (the GPU waits for it when the caller synchronises between calls). The dispatcher's
custom-op wrapping took about 0.1 ms per call on the H100 machine; Tensor.__dlpack__ took 4 µs per
argument against 0.5 µs for torch.utils.dlpack.to_dlpack, which the extension calls get instead. The eager
path also keeps the state saved for backward in one buffer (one allocation and one argument in place of
six; a call without gradients shares it with the workspace), and every call takes the raw CUDA stream and a
cached config: measured on the H200 machine's host, the forward spent ~9 µs per allocation, ~3 µs per DLPack
conversion and ~25 µs constructing the torch.cuda.Stream object, all before its first kernel. So the eager
path converts only the caller's tensors (x, the weights, d_out) to DLPack and hands the buffers it allocates
itself to the extension as addresses, and its backward allocates only the gradients wanted.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _C


_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)


def compiling() -> bool:
    """True while torch.compile traces (dynamo evaluates this as a constant)."""
    return _is_compiling is not None and _is_compiling()


class _Extension:
    """fusedmoe._C with tensor arguments handed over as DLPack capsules (see the module docstring)."""

    def __getattr__(self, name):
        fn = getattr(_C, name)

        def call(*args):
            return fn(*[torch.utils.dlpack.to_dlpack(a) if isinstance(a, Tensor) else a for a in args])

        setattr(self, name, call)
        return call


_ext = _Extension()


def _eager_function(name: str, setup_context, backward):
    """A torch.autograd.Function for an op's eager path: apply(*args, outputs) records the outputs of kernels
    already launched (see _run) for the op's autograd rule, `backward(ctx, *grads)`.

    The kernels run before apply, so the Function's own host time (~35 µs on the H200 machine) overlaps the GPU
    work instead of delaying the first kernel; the outputs come in as one non-tensor argument, so autograd takes
    them as they are (an output that was a tensor argument would come back as a view). The forward takes ctx
    itself: a separate setup_context makes every apply() bind its arguments through inspect.signature."""

    def forward(ctx, *args_and_outputs):
        *args, outputs = args_and_outputs
        setup_context(ctx, args, outputs)
        return outputs

    def backward_(ctx, *grads):
        return (*backward(ctx, *grads), None)  # (none for the outputs argument)

    return type(name, (torch.autograd.Function,), dict(forward=staticmethod(forward), backward=staticmethod(backward_)))


def _needs_grad(tensors) -> bool:
    """Whether autograd must record a call on these differentiable inputs."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t.requires_grad:
            return True
    return False


def _run(op, function, impl, args, differentiable, inference=None):
    """The custom op under torch.compile; else, where a gradient may be needed, the implementation and then the
    autograd.Function recording its outputs; else the implementation alone (or `inference`, which keeps nothing for
    a backward)."""
    if compiling():
        return op(*args)
    if _needs_grad(differentiable):
        return function.apply(*args, impl(*args))
    return (inference or impl)(*args)


_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32", torch.float64: "float64"}


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _DTYPE_NAMES:
        raise TypeError(f"fusedmoe: unsupported dtype {dtype}; expected one of {list(_DTYPE_NAMES)}")
    return _DTYPE_NAMES[dtype]


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _stream(t: Tensor) -> int:
    """The current CUDA stream of t's device as an integer (0 on the CPU), without building a Stream object."""
    if not t.is_cuda:
        return 0
    return _raw_stream(t.get_device()) if _raw_stream is not None else torch.cuda.current_stream(t.device).cuda_stream


def _scratch(nbytes: int, device: torch.device) -> Tensor:
    # 256 spare bytes: the extension aligns the region to 256 bytes.
    return torch.empty(nbytes + 256, dtype=torch.uint8, device=device)


_configs: dict = {}  # (dtype, gate_up_proj shape, top_k, norm, kernels) -> _C.Config


def _config(x: Tensor, gate_up_proj: Tensor, top_k: int, norm_topk_prob: bool, kernels=()) -> "_C.Config":
    """kernels: [] (the heuristic) or the 9 ints of kernel_config.kernels_arg (forward, dX, dW choices)."""
    key = (x.dtype, gate_up_proj.shape, top_k, norm_topk_prob, tuple(kernels))
    cfg = _configs.get(key)
    if cfg is None:
        if gate_up_proj.dim() != 3:
            raise ValueError(f"fusedmoe: gate_up_proj must be [E, 2I, H], got shape {tuple(gate_up_proj.shape)}")
        E, two_i, H = gate_up_proj.shape
        cfg = _configs[key] = _C.Config(H, two_i // 2, E, top_k, norm_topk_prob, dtype_name(x.dtype), list(kernels))
    return cfg


def _family(kernels, i: int) -> list:
    """One family's [kernel, block_n, cluster_m] out of the 9-int kernels argument ([] when none was given)."""
    return list(kernels[3 * i:3 * i + 3]) if kernels else []


# ---------------------------------------------------------------- the whole block


@torch.library.custom_op("fusedmoe::moe_forward", mutates_args=())
def moe_forward(x: Tensor, gate: Tensor, gate_up_proj: Tensor, down_proj: Tensor, top_k: int,
                norm_topk_prob: bool, kernels: list[int]
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, router_logits, topk_weights, topk_ids, gather_indices, m_sizes, expert_offsets, gate_up_out)."""
    return _moe_forward_impl(x, gate, gate_up_proj, down_proj, top_k, norm_topk_prob, kernels)


def _moe_forward_impl(x, gate, gate_up_proj, down_proj, top_k, norm_topk_prob, kernels):
    cfg = _config(x, gate_up_proj, top_k, norm_topk_prob, kernels)
    out, logits, tw, ids, gather, m_sizes, offsets, y1 = _forward_outputs(x, gate, gate_up_proj, top_k)
    ws = _scratch(_C.moe_forward_workspace_bytes(cfg, x.shape[0]), x.device)
    _ext.moe_forward(cfg, x, gate, gate_up_proj, down_proj, out, logits, tw, ids, gather, m_sizes, offsets, y1, ws,
                   _stream(x))
    return out, logits, tw, ids, gather, m_sizes, offsets, y1


def _forward_outputs(x, gate, gate_up_proj, top_k):
    T = x.shape[0]
    E = gate.shape[0]
    M = T * top_k
    i32 = dict(dtype=torch.int32, device=x.device)
    return (x.new_empty(x.shape), x.new_empty((T, E)), x.new_empty((T, top_k)), torch.empty((T, top_k), **i32),
            torch.empty((M,), **i32), torch.empty((E,), **i32), torch.empty((E + 1,), **i32),
            x.new_empty((M, gate_up_proj.shape[1])))


@moe_forward.register_fake
def _(x, gate, gate_up_proj, down_proj, top_k, norm_topk_prob, kernels):
    return _forward_outputs(x, gate, gate_up_proj, top_k)


@torch.library.custom_op("fusedmoe::moe_backward", mutates_args=())
def moe_backward(d_out: Tensor, x: Tensor, gate: Tensor, gate_up_proj: Tensor, down_proj: Tensor, logits: Tensor,
                 topk_weights: Tensor, topk_ids: Tensor, gather: Tensor, m_sizes: Tensor, offsets: Tensor,
                 y1: Tensor, top_k: int, norm_topk_prob: bool, need_dx: bool, need_dgate: bool, need_dw1: bool,
                 need_dw2: bool, kernels: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, d_gate, d_gate_up_proj, d_down_proj); a gradient not needed comes back empty and costs nothing."""
    return _moe_backward_impl(d_out, x, gate, gate_up_proj, down_proj, logits, topk_weights, topk_ids, gather,
                              m_sizes, offsets, y1, top_k, norm_topk_prob, need_dx, need_dgate, need_dw1, need_dw2,
                              kernels)


def _moe_backward_impl(d_out, x, gate, gate_up_proj, down_proj, logits, topk_weights, topk_ids, gather, m_sizes,
                       offsets, y1, top_k, norm_topk_prob, need_dx, need_dgate, need_dw1, need_dw2, kernels):
    cfg = _config(x, gate_up_proj, top_k, norm_topk_prob, kernels)
    dx, dg, dw1, dw2 = _backward_outputs(x, gate, gate_up_proj, down_proj, need_dx, need_dgate, need_dw1, need_dw2)
    ws = _scratch(_C.moe_backward_workspace_bytes(cfg, x.shape[0], need_dx, need_dgate, need_dw1, need_dw2), x.device)
    _ext.moe_backward(cfg, d_out, x, gate, gate_up_proj, down_proj, logits, topk_weights, topk_ids, gather, m_sizes,
                    offsets, y1, dx if need_dx else None, dg if need_dgate else None, dw1 if need_dw1 else None,
                    dw2 if need_dw2 else None, ws, _stream(x))
    return dx, dg, dw1, dw2


def _backward_outputs(x, gate, gate_up_proj, down_proj, need_dx, need_dgate, need_dw1, need_dw2):
    def maybe(need, like):
        return like.new_empty(like.shape) if need else like.new_empty((0,))
    return maybe(need_dx, x), maybe(need_dgate, gate), maybe(need_dw1, gate_up_proj), maybe(need_dw2, down_proj)


@moe_backward.register_fake
def _(d_out, x, gate, gate_up_proj, down_proj, logits, topk_weights, topk_ids, gather, m_sizes, offsets, y1, top_k,
      norm_topk_prob, need_dx, need_dgate, need_dw1, need_dw2, kernels):
    return _backward_outputs(x, gate, gate_up_proj, down_proj, need_dx, need_dgate, need_dw1, need_dw2)


def _moe_setup_context(ctx, inputs, output):
    x, gate, gate_up_proj, down_proj, top_k, norm, kernels = inputs
    out, logits, tw, ids, gather, m_sizes, offsets, y1 = output
    ctx.save_for_backward(x, gate, gate_up_proj, down_proj, logits, tw, ids, gather, m_sizes, offsets, y1)
    ctx.top_k, ctx.norm, ctx.kernels = top_k, norm, kernels
    ctx.mark_non_differentiable(tw, ids, gather, m_sizes, offsets, y1)
    ctx.set_materialize_grads(False)


def _moe_backward_rule(ctx, d_out, d_logits, *unused):
    """The op's autograd rule: its backward through the moe_backward op (AOTAutograd traces it under
    torch.compile)."""
    x, gate, w1, w2, logits, tw, ids, gather, m_sizes, offsets, y1 = ctx.saved_tensors
    need = ctx.needs_input_grad[:4]
    d_out = torch.zeros_like(x) if d_out is None else d_out.contiguous()
    grads = moe_backward(d_out, x, gate, w1, w2, logits, tw, ids, gather, m_sizes, offsets, y1, ctx.top_k, ctx.norm,
                         need[0], need[1], need[2], need[3], ctx.kernels)
    return _block_grads(need, grads, d_logits, x, gate)


def _block_grads(need, grads, d_logits, x, gate) -> tuple:
    """The block's input gradients from the backward's (dx, d_gate, d_gate_up_proj, d_down_proj), plus the
    router-logit gradient where the caller used router_logits directly (an auxiliary loss, say)."""
    dx, dg, dw1, dw2 = grads
    if d_logits is not None:
        if need[0]:
            dx = dx + (d_logits @ gate).to(dx.dtype)
        if need[1]:
            dg = dg + (d_logits.transpose(0, 1) @ x).to(dg.dtype)
    return (dx if need[0] else None, dg if need[1] else None, dw1 if need[2] else None, dw2 if need[3] else None,
            None, None, None)


torch.library.register_autograd("fusedmoe::moe_forward", _moe_backward_rule, setup_context=_moe_setup_context)


_forward_plans: dict = {}  # (dtype, gate_up_proj shape, top_k, norm, kernels, T) -> _ForwardPlan


class _ForwardPlan:
    """What an eager block call needs besides its tensors, looked up once per problem: the config and the byte
    sizes of its buffers (allocated by _scratch, which adds the alignment's spare bytes)."""
    __slots__ = ("cfg", "saved_bytes", "inference_bytes", "ws_bytes")

    def __init__(self, cfg, T):
        ws = _C.moe_forward_workspace_bytes(cfg, T)
        self.cfg = cfg
        self.saved_bytes = _C.moe_saved_bytes(cfg, T)
        self.inference_bytes = _C.moe_saved_bytes(cfg, T, False) + ws  # (the workspace follows the state)
        self.ws_bytes = ws


def _forward_plan(x, gate_up_proj, top_k, norm_topk_prob, kernels) -> _ForwardPlan:
    T = x.shape[0]
    key = (x.dtype, gate_up_proj.shape, top_k, norm_topk_prob, tuple(kernels), T)
    plan = _forward_plans.get(key)
    if plan is None:
        if len(_forward_plans) >= 256:  # many distinct token counts: start over rather than grow without bound
            _forward_plans.clear()
        plan = _forward_plans[key] = _ForwardPlan(_config(x, gate_up_proj, top_k, norm_topk_prob, kernels), T)
    return plan


_dlpack = torch.utils.dlpack.to_dlpack
_packed = _C  # the extension's moe_forward_packed / moe_backward_packed (scripts/host_overhead.py marks its calls)


def _moe_block_eager(x, gate, gate_up_proj, down_proj, top_k, norm_topk_prob, kernels, keep_state):
    """(out, router_logits, saved, cfg): the block's forward with the state for backward in one buffer (`saved`);
    without keep_state (inference) that buffer also holds the workspace, and the first GEMM's output (Y1) is
    neither kept nor written. Only x and the weights cross as DLPack tensors; the buffers allocated here go as
    addresses (the extension's moe_forward_packed)."""
    plan = _forward_plan(x, gate_up_proj, top_k, norm_topk_prob, kernels)
    T = x.shape[0]
    out, logits = x.new_empty(x.shape), x.new_empty((T, gate.shape[0]))
    if keep_state:
        saved, ws = _scratch(plan.saved_bytes, x.device), _scratch(plan.ws_bytes, x.device)
        ws_address, ws_bytes = ws.data_ptr(), ws.numel()
    else:
        saved = _scratch(plan.inference_bytes, x.device)
        ws_address, ws_bytes = 0, 0
    _packed.moe_forward_packed(plan.cfg, _dlpack(x), _dlpack(gate), _dlpack(gate_up_proj), _dlpack(down_proj),
                               out.data_ptr(), logits.data_ptr(), saved.data_ptr(), saved.numel(), ws_address, ws_bytes,
                               _stream(x), keep_state)
    return out, logits, saved, plan.cfg


def _moe_eager_setup_context(ctx, inputs, output):
    x, gate, gate_up_proj, down_proj, top_k, norm, kernels = inputs
    out, logits, saved, cfg = output
    ctx.save_for_backward(x, gate, gate_up_proj, down_proj, logits, saved)
    ctx.top_k, ctx.norm, ctx.kernels, ctx.cfg = top_k, norm, kernels, cfg
    ctx.mark_non_differentiable(saved)
    ctx.set_materialize_grads(False)


def _moe_eager_backward(ctx, d_out, d_logits, *_):
    """The op's autograd rule (_moe_backward_rule) over the eager path's state buffer; only the gradients wanted
    are allocated."""
    x, gate, w1, w2, logits, saved = ctx.saved_tensors
    need = ctx.needs_input_grad[:4]
    d_out = torch.zeros_like(x) if d_out is None else d_out.contiguous()
    cfg = ctx.cfg
    grads = [like.new_empty(like.shape) if n else None for like, n in zip((x, gate, w1, w2), need)]
    ws = _scratch(_C.moe_backward_workspace_bytes(cfg, x.shape[0], *need), x.device)
    _packed.moe_backward_packed(cfg, _dlpack(d_out), _dlpack(x), _dlpack(gate), _dlpack(w1), _dlpack(w2),
                                logits.data_ptr(), saved.data_ptr(), saved.numel(),
                                *[0 if g is None else g.data_ptr() for g in grads], ws.data_ptr(), ws.numel(),
                                _stream(x))
    return _block_grads(need, grads, d_logits, x, gate)


_MoeBlockFunction = _eager_function("_MoeBlockFunction", _moe_eager_setup_context, _moe_eager_backward)


def moe_block(x: Tensor, gate: Tensor, gate_up_proj: Tensor, down_proj: Tensor, top_k: int, norm_topk_prob: bool,
              kernels: list[int]) -> tuple[Tensor, Tensor]:
    """(out, router_logits): the custom op moe_forward under torch.compile, else the eager path (same kernels,
    same autograd rule) without the dispatcher."""
    args = (x, gate, gate_up_proj, down_proj, top_k, norm_topk_prob, kernels)
    if compiling():
        return moe_forward(*args)[:2]
    if _needs_grad(args[:4]):
        return _MoeBlockFunction.apply(*args, _moe_block_eager(*args, True))[:2]
    return _moe_block_eager(*args, False)[:2]


# ---------------------------------------------------------------- the experts, given the routing


@torch.library.custom_op("fusedmoe::experts_forward", mutates_args=())
def experts_forward(x: Tensor, topk_weights: Tensor, topk_ids: Tensor, gate_up_proj: Tensor,
                    down_proj: Tensor, kernels: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, gather_indices, m_sizes, expert_offsets, gate_up_out) for int32 topk_ids [T, k]."""
    return _experts_forward_impl(x, topk_weights, topk_ids, gate_up_proj, down_proj, kernels)


def _experts_forward_impl(x, topk_weights, topk_ids, gate_up_proj, down_proj, kernels, keep_state=True):
    """experts_forward; without keep_state (inference) gate_up_out is neither kept nor written: None."""
    cfg = _config(x, gate_up_proj, topk_ids.shape[1], False, kernels)
    out, gather, m_sizes, offsets, y1 = _experts_outputs(x, topk_ids, gate_up_proj, keep_state)
    ws = _scratch(_C.moe_forward_workspace_bytes(cfg, x.shape[0]), x.device)
    _ext.moe_experts_forward(cfg, x, topk_weights, topk_ids, gate_up_proj, down_proj, out, gather, m_sizes, offsets, y1,
                           ws, _stream(x))
    return out, gather, m_sizes, offsets, y1


def _experts_outputs(x, topk_ids, gate_up_proj, keep_state=True):
    M = topk_ids.numel()
    E = gate_up_proj.shape[0]
    i32 = dict(dtype=torch.int32, device=x.device)
    return (x.new_empty(x.shape), torch.empty((M,), **i32), torch.empty((E,), **i32), torch.empty((E + 1,), **i32),
            x.new_empty((M, gate_up_proj.shape[1])) if keep_state else None)


@experts_forward.register_fake
def _(x, topk_weights, topk_ids, gate_up_proj, down_proj, kernels):
    return _experts_outputs(x, topk_ids, gate_up_proj)


@torch.library.custom_op("fusedmoe::experts_backward", mutates_args=())
def experts_backward(d_out: Tensor, x: Tensor, topk_weights: Tensor, gate_up_proj: Tensor, down_proj: Tensor,
                     gather: Tensor, m_sizes: Tensor, offsets: Tensor, y1: Tensor, need_dx: bool, need_dtw: bool,
                     need_dw1: bool, need_dw2: bool, kernels: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, d_topk_weights (float32), d_gate_up_proj, d_down_proj); unneeded ones come back empty."""
    return _experts_backward_impl(d_out, x, topk_weights, gate_up_proj, down_proj, gather, m_sizes, offsets, y1,
                                  need_dx, need_dtw, need_dw1, need_dw2, kernels)


def _experts_backward_impl(d_out, x, topk_weights, gate_up_proj, down_proj, gather, m_sizes, offsets, y1, need_dx,
                           need_dtw, need_dw1, need_dw2, kernels):
    cfg = _config(x, gate_up_proj, topk_weights.shape[1], False, kernels)
    dx, dtw, dw1, dw2 = _experts_backward_outputs(x, topk_weights, gate_up_proj, down_proj, need_dx, need_dtw,
                                                  need_dw1, need_dw2)
    ws = _scratch(_C.moe_experts_backward_workspace_bytes(cfg, x.shape[0], need_dx, need_dtw, need_dw1, need_dw2),
                  x.device)
    _ext.moe_experts_backward(cfg, d_out, x, topk_weights, gate_up_proj, down_proj, gather, m_sizes, offsets, y1,
                            dx if need_dx else None, dtw if need_dtw else None, dw1 if need_dw1 else None,
                            dw2 if need_dw2 else None, ws, _stream(x))
    return dx, dtw, dw1, dw2


def _experts_backward_outputs(x, topk_weights, gate_up_proj, down_proj, need_dx, need_dtw, need_dw1, need_dw2):
    def maybe(need, like, dtype=None):
        return torch.empty(like.shape if need else (0,), dtype=dtype or like.dtype, device=like.device)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (maybe(need_dx, x), maybe(need_dtw, topk_weights, acc), maybe(need_dw1, gate_up_proj),
            maybe(need_dw2, down_proj))


@experts_backward.register_fake
def _(d_out, x, topk_weights, gate_up_proj, down_proj, gather, m_sizes, offsets, y1, need_dx, need_dtw, need_dw1,
      need_dw2, kernels):
    return _experts_backward_outputs(x, topk_weights, gate_up_proj, down_proj, need_dx, need_dtw, need_dw1, need_dw2)


def _experts_setup_context(ctx, inputs, output):
    x, tw, ids, w1, w2, kernels = inputs
    out, gather, m_sizes, offsets, y1 = output
    ctx.save_for_backward(x, tw, w1, w2, gather, m_sizes, offsets, y1)
    ctx.kernels = kernels
    ctx.mark_non_differentiable(gather, m_sizes, offsets, y1)
    ctx.set_materialize_grads(False)


def _experts_backward_rule(ctx, d_out, *unused):
    return _experts_backward_with(experts_backward, ctx, d_out)


def _experts_backward_with(backward, ctx, d_out, *unused):
    """The experts' autograd rule through `backward` (the op, or on the eager path its implementation)."""
    x, tw, w1, w2, gather, m_sizes, offsets, y1 = ctx.saved_tensors
    nx, ntw, _, nw1, nw2 = ctx.needs_input_grad[:5]
    if d_out is None:
        return None, None, None, None, None, None
    dx, dtw, dw1, dw2 = backward(d_out.contiguous(), x, tw, w1, w2, gather, m_sizes, offsets, y1, nx, ntw, nw1, nw2,
                                 ctx.kernels)
    return (dx if nx else None, dtw.to(tw.dtype) if ntw else None, None, dw1 if nw1 else None,
            dw2 if nw2 else None, None)


torch.library.register_autograd("fusedmoe::experts_forward", _experts_backward_rule,
                                setup_context=_experts_setup_context)


_ExpertsFunction = _eager_function("_ExpertsFunction", _experts_setup_context,
                                   lambda ctx, *grads: _experts_backward_with(_experts_backward_impl, ctx, *grads))


def experts(x: Tensor, topk_weights: Tensor, topk_ids: Tensor, gate_up_proj: Tensor, down_proj: Tensor,
            kernels: list[int]) -> tuple:
    """experts_forward's outputs: the custom op under torch.compile, else the eager path (without a gradient to
    compute: gate_up_out None, not written)."""
    return _run(experts_forward, _ExpertsFunction, _experts_forward_impl,
                (x, topk_weights, topk_ids, gate_up_proj, down_proj, kernels),
                (x, topk_weights, gate_up_proj, down_proj),
                inference=lambda *args: _experts_forward_impl(*args, keep_state=False))


# ---------------------------------------------------------------- routing


@torch.library.custom_op("fusedmoe::route", mutates_args=())
def route(x: Tensor, gate: Tensor, top_k: int, norm_topk_prob: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(router_logits [T,E], topk_weights [T,k] in x's dtype, topk_ids [T,k] int32)."""
    logits, tw, ids = _route_outputs(x, gate, top_k)
    _ext.router_logits(x, gate, logits, _stream(x))
    _ext.route_topk(logits, top_k, norm_topk_prob, tw, ids, _stream(x))
    return logits, tw, ids


def _route_outputs(x, gate, top_k):
    T = x.shape[0]
    return (x.new_empty((T, gate.shape[0])), x.new_empty((T, top_k)),
            torch.empty((T, top_k), dtype=torch.int32, device=x.device))


@route.register_fake
def _(x, gate, top_k, norm_topk_prob):
    return _route_outputs(x, gate, top_k)


@torch.library.custom_op("fusedmoe::route_backward", mutates_args=())
def route_backward(d_logits: Optional[Tensor], d_weights: Optional[Tensor], x: Tensor, gate: Tensor, logits: Tensor,
                   topk_ids: Tensor, norm_topk_prob: bool, need_dx: bool, need_dgate: bool) -> tuple[Tensor, Tensor]:
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    total = torch.zeros(logits.shape, dtype=acc, device=x.device)
    if d_weights is not None:
        _ext.route_topk_backward(logits, topk_ids, d_weights.contiguous(), norm_topk_prob, total, _stream(x))
    if d_logits is not None:
        total += d_logits
    dx = x.new_empty(x.shape if need_dx else (0,))
    dg = gate.new_empty(gate.shape if need_dgate else (0,))
    _ext.router_logits_backward(total, x, gate, dx if need_dx else None, dg if need_dgate else None, False, _stream(x))
    return dx, dg


@route_backward.register_fake
def _(d_logits, d_weights, x, gate, logits, topk_ids, norm_topk_prob, need_dx, need_dgate):
    return x.new_empty(x.shape if need_dx else (0,)), gate.new_empty(gate.shape if need_dgate else (0,))


def _route_setup_context(ctx, inputs, output):
    x, gate, top_k, norm = inputs
    logits, tw, ids = output
    ctx.save_for_backward(x, gate, logits, ids)
    ctx.norm = norm
    ctx.mark_non_differentiable(ids)
    ctx.set_materialize_grads(False)


def _route_backward_rule(ctx, d_logits, d_weights, _):
    x, gate, logits, ids = ctx.saved_tensors
    nx, ng = ctx.needs_input_grad[:2]
    if (d_logits is None and d_weights is None) or not (nx or ng):
        return None, None, None, None
    dx, dg = route_backward(d_logits, d_weights, x, gate, logits, ids, ctx.norm, nx, ng)
    return (dx if nx else None, dg if ng else None, None, None)


torch.library.register_autograd("fusedmoe::route", _route_backward_rule, setup_context=_route_setup_context)


@torch.library.custom_op("fusedmoe::sort_by_expert", mutates_args=())
def sort_by_expert(topk_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """(gather_indices [T·k], m_sizes [E], expert_offsets [E+1]), all int32; stable."""
    gather, m_sizes, offsets = _sort_outputs(topk_ids, num_experts)
    _ext.sort_by_expert(topk_ids, num_experts, gather, m_sizes, offsets, _stream(topk_ids))
    return gather, m_sizes, offsets


def _sort_outputs(topk_ids, E):
    i32 = dict(dtype=torch.int32, device=topk_ids.device)
    return torch.empty((topk_ids.numel(),), **i32), torch.empty((E,), **i32), torch.empty((E + 1,), **i32)


@sort_by_expert.register_fake
def _(topk_ids, num_experts):
    return _sort_outputs(topk_ids, num_experts)


# ---------------------------------------------------------------- the grouped GEMM building block


@torch.library.custom_op("fusedmoe::grouped_gemm", mutates_args=())
def grouped_gemm_op(X: Tensor, W: Tensor, expert_offsets: Tensor, gather_indices: Optional[Tensor], top_k: int,
                    permute_x: bool, permute_y: bool, row_weights: Optional[Tensor], kernels: list[int]) -> Tensor:
    """kernels: [] or the 9 ints of kernel_config.kernels_arg; the forward uses the first family's choice."""
    Y = _gemm_output(X, W, gather_indices, top_k, permute_x)
    _ext.grouped_gemm(X, W, expert_offsets, gather_indices, top_k, permute_x, permute_y, Y, row_weights, _stream(X),
                    _family(kernels, 0))
    return Y


def _gemm_output(X, W, gather, top_k, permute_x):
    M = gather.shape[0] if gather is not None else (X.shape[0] * top_k if permute_x else X.shape[0])
    return X.new_empty((M, W.shape[1]))


@grouped_gemm_op.register_fake
def _(X, W, expert_offsets, gather_indices, top_k, permute_x, permute_y, row_weights, kernels):
    return _gemm_output(X, W, gather_indices, top_k, permute_x)


@torch.library.custom_op("fusedmoe::grouped_gemm_dX", mutates_args=())
def grouped_gemm_dX_op(dY: Tensor, W: Tensor, expert_offsets: Tensor, gather_indices: Optional[Tensor], top_k: int,
                       permute_x: bool, permute_y: bool, x_rows: int, tiling: list[int]) -> Tensor:
    dX = dY.new_empty((x_rows, W.shape[2]))
    _ext.grouped_gemm_dX(dY, W, expert_offsets, gather_indices, top_k, permute_x, permute_y, dX, _stream(dY), tiling)
    return dX


@grouped_gemm_dX_op.register_fake
def _(dY, W, expert_offsets, gather_indices, top_k, permute_x, permute_y, x_rows, tiling):
    return dY.new_empty((x_rows, W.shape[2]))


@torch.library.custom_op("fusedmoe::grouped_gemm_dW", mutates_args=())
def grouped_gemm_dW_op(X: Tensor, dY: Tensor, expert_offsets: Tensor, gather_indices: Optional[Tensor], top_k: int,
                       permute_x: bool, permute_y: bool, num_experts: int, tiling: list[int]) -> Tensor:
    dW = X.new_empty((num_experts, dY.shape[1], X.shape[1]))
    _ext.grouped_gemm_dW(X, dY, expert_offsets, gather_indices, top_k, permute_x, permute_y, dW, _stream(X), tiling)
    return dW


@grouped_gemm_dW_op.register_fake
def _(X, dY, expert_offsets, gather_indices, top_k, permute_x, permute_y, num_experts, tiling):
    return X.new_empty((num_experts, dY.shape[1], X.shape[1]))


def _gemm_setup_context(ctx, inputs, output):
    X, W, offsets, gather, top_k, px, py, row_weights, kernels = inputs
    ctx.save_for_backward(X, W, offsets, gather)
    ctx.args = (top_k, px, py)
    ctx.kernels = kernels
    ctx.has_row_weights = row_weights is not None


def _gemm_backward_rule(ctx, dY):
    X, W, offsets, gather = ctx.saved_tensors
    top_k, px, py = ctx.args
    if ctx.has_row_weights:
        raise RuntimeError("fusedmoe.grouped_gemm: fuse_mul_post (topk_weights in the GEMM) is inference-only; "
                           "it has no backward")
    nX, nW = ctx.needs_input_grad[:2]
    dY = dY.contiguous()
    dX = grouped_gemm_dX_op(dY, W, offsets, gather, top_k, px, py, X.shape[0], _family(ctx.kernels, 1)) if nX else None
    dW = grouped_gemm_dW_op(X, dY, offsets, gather, top_k, px, py, W.shape[0], _family(ctx.kernels, 2)) if nW else None
    return dX, dW, None, None, None, None, None, None, None


torch.library.register_autograd("fusedmoe::grouped_gemm", _gemm_backward_rule, setup_context=_gemm_setup_context)
