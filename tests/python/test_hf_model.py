"""A whole tiny Qwen3-MoE causal LM: experts_implementation="fusedmoe" and patch_model against the
default implementation, in inference and for one training step."""
import copy

import pytest
import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

import fusedmoe
from conftest import dtype_for, rel_err, tol_for


def tiny_model(device, dtype):
    cfg = Qwen3MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                         max_position_embeddings=64, mlp_only_layers=[])
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(cfg)
    with torch.no_grad():  # router weights are zero-initialised; give the routing something to decide
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.3)
    return model.to(device=device, dtype=dtype)


def train_step(model, ids):
    """One SGD step; returns the loss and the gradients it applied."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.grad is not None}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters()), "the step changed nothing"
    return loss.detach(), grads


@pytest.mark.parametrize("how", ["experts_implementation", "patch_model"])
def test_tiny_causal_lm_matches_default(device, how):
    dtype = dtype_for(device)
    base = tiny_model(device, dtype)
    ours = copy.deepcopy(base)
    if how == "experts_implementation":
        ours.set_experts_implementation("fusedmoe")
        assert ours.config._experts_implementation == "fusedmoe"
    else:
        assert fusedmoe.patch_model(ours) == 2
        assert all(type(l.mlp).__name__ == "FusedSparseMoeBlock" for l in ours.model.layers)
        assert set(dict(ours.named_parameters())) == set(dict(base.named_parameters()))
    ids = torch.randint(0, 128, (2, 12), device=device)
    # float64 copy on the CPU (exact from the 16-bit weights): the arbiter of the 16-bit gradients below.
    exact = copy.deepcopy(base).to(device="cpu", dtype=torch.float64) if dtype != torch.float32 else None
    if exact is not None:
        exact.set_experts_implementation("eager")
    with torch.no_grad():
        ref = base(input_ids=ids).logits
        got = ours(input_ids=ids).logits
    tol = tol_for(dtype)
    assert rel_err(got, ref) < tol
    loss_ref, grads_ref = train_step(base, ids)
    loss_got, grads_got = train_step(ours, ids)
    assert rel_err(loss_got, loss_ref) < tol
    # One SGD step moves each weight by −lr·grad: the gradients must agree (in bf16 a single step of
    # these weights is at the rounding step of the weights themselves, so the stepped weights can't tell).
    names = ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj",
             "model.layers.0.mlp.gate.weight"]
    if dtype == torch.float32:
        # In bf16, layer 1's routing already differs on near-ties (its input carries layer 0's bf16 rounding),
        # so its sparse expert gradients are only comparable in float32.
        names += ["model.layers.1.mlp.experts.down_proj", "model.embed_tokens.weight"]
    if exact is not None:
        _, grads_exact = train_step(exact, ids.cpu())
    for name in names:
        assert grads_ref[name].norm() > 0, name
        if exact is None:
            assert rel_err(grads_got[name], grads_ref[name]) < tol, name
        else:
            # Two 16-bit implementations differ by both their roundings; judge ours against float64, no worse
            # than the default implementation (with a margin) or within 5e-2 outright.
            err_ours = rel_err(grads_got[name].cpu(), grads_exact[name])
            err_default = rel_err(grads_ref[name].cpu(), grads_exact[name])
            assert err_ours < max(1.5 * err_default, 5e-2), f"{name}: {err_ours:.3g} vs default {err_default:.3g}"

