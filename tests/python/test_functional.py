"""The functional API (grouped_gemm, route, sort_by_expert) against plain PyTorch, with gradients."""
import pytest
import torch

import fusedmoe
from conftest import dtype_for, rel_err, tol_for


def routing(T, E, k, device):
    ids = torch.stack([torch.randperm(E, device=device)[:k] for _ in range(T)]).int()
    gather, m_sizes, offsets = fusedmoe.sort_by_expert(ids, E)
    return ids, gather, m_sizes, offsets


def test_sort_by_expert_is_a_stable_argsort(device):
    ids = torch.randint(0, 7, (40, 3), device=device, dtype=torch.int32)
    gather, m_sizes, offsets = fusedmoe.sort_by_expert(ids, 7)
    ref = torch.sort(ids.flatten().long(), stable=True).indices
    assert torch.equal(gather.long(), ref)
    assert torch.equal(m_sizes.long(), torch.bincount(ids.flatten().long(), minlength=7))
    assert torch.equal(offsets[1:].long(), torch.cumsum(m_sizes.long(), 0)) and offsets[0] == 0


@pytest.mark.parametrize("permute_x,permute_y", [(True, False), (False, True), (False, False)])
def test_grouped_gemm_and_gradients_match_pytorch(device, permute_x, permute_y):
    dtype = dtype_for(device)
    T, E, k, N, K = 21, 5, 2, 24, 40
    ids, gather, m_sizes, _ = routing(T, E, k, device)
    X = torch.randn(T if permute_x else T * k, K, device=device, dtype=dtype, requires_grad=True)
    W = torch.randn(E, N, K, device=device, dtype=dtype, requires_grad=True)
    Y = fusedmoe.grouped_gemm(X, W, m_sizes, k, gather, permute_x=permute_x, permute_y=permute_y,
                              is_first_gemm=not permute_y)
    g = gather.long()
    expert = torch.repeat_interleave(torch.arange(E, device=device), m_sizes.long())
    Xr = X.detach().clone().requires_grad_()
    Wr = W.detach().clone().requires_grad_()
    rows = Xr[g // k] if permute_x else Xr
    ref_expert_order = torch.einsum("mk,mnk->mn", rows.double(), Wr.double()[expert])
    ref = torch.empty_like(ref_expert_order).index_copy(0, g, ref_expert_order) if permute_y else ref_expert_order
    assert rel_err(Y, ref) < tol_for(dtype)
    dY = torch.randn_like(Y)
    Y.backward(dY)
    ref.backward(dY.double())
    assert rel_err(X.grad, Xr.grad) < tol_for(dtype)
    assert rel_err(W.grad, Wr.grad) < tol_for(dtype)


def test_grouped_gemm_fuse_mul_post_and_argument_checks(device):
    dtype = dtype_for(device)
    T, E, k = 9, 3, 2
    ids, gather, m_sizes, _ = routing(T, E, k, device)
    X = torch.randn(T * k, 16, device=device, dtype=dtype)
    W = torch.randn(E, 8, 16, device=device, dtype=dtype)
    w = torch.rand(T, k, device=device, dtype=dtype)
    with torch.no_grad():
        plain = fusedmoe.grouped_gemm(X, W, m_sizes, k, gather, permute_y=True, is_first_gemm=False)
        scaled = fusedmoe.grouped_gemm(X, W, m_sizes, k, gather, permute_y=True, is_first_gemm=False,
                                       topk_weights=w, fuse_mul_post=True)
    assert rel_err(scaled, plain * w.reshape(-1, 1)) < tol_for(dtype)
    with pytest.raises(ValueError, match="first GEMM only"):
        fusedmoe.grouped_gemm(X, W, m_sizes, k, gather, permute_x=True, is_first_gemm=False)
    with pytest.raises(ValueError, match="need gather_indices"):
        fusedmoe.grouped_gemm(X, W, m_sizes, k, None, permute_y=True, is_first_gemm=False)
    with pytest.raises(ValueError, match="inference-only"):
        fusedmoe.grouped_gemm(X.requires_grad_(), W, m_sizes, k, gather, topk_weights=w, fuse_mul_post=True)
    with pytest.raises(ValueError, match=r"m_sizes must be \[E=3\]"):
        fusedmoe.grouped_gemm(X, W, m_sizes[:2], k, gather)
    with pytest.raises(ValueError, match="'W'"):
        fusedmoe.grouped_gemm(X, W[:, :, :15].contiguous(), m_sizes, k, gather)
    with pytest.raises(ValueError, match="must be contiguous"):
        fusedmoe.grouped_gemm(X.detach().t().contiguous().t(), W, m_sizes, k, gather)


def test_route_matches_pytorch_with_gradients():
    # float64 on the CPU: the router's gradient path checked tightly.
    T, H, E, k = 17, 12, 7, 3
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    gate = torch.randn(E, H, dtype=torch.float64, requires_grad=True)
    logits, w, ids = fusedmoe.route(x, gate, k, True)
    xr, gr = x.detach().clone().requires_grad_(), gate.detach().clone().requires_grad_()
    ref_logits = xr @ gr.T
    p = torch.softmax(ref_logits, -1)
    ref_w, ref_ids = torch.topk(p, k)
    ref_w = ref_w / ref_w.sum(-1, keepdim=True)
    assert torch.equal(ids.long(), ref_ids)
    assert rel_err(w, ref_w) < 1e-12 and rel_err(logits, ref_logits) < 1e-12
    gw, gl = torch.randn_like(w), torch.randn_like(logits)
    (w * gw).sum().add((logits * gl).sum()).backward()
    (ref_w * gw).sum().add((ref_logits * gl).sum()).backward()
    assert rel_err(x.grad, xr.grad) < 1e-10 and rel_err(gate.grad, gr.grad) < 1e-10
