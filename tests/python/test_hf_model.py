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
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    return loss.detach()


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
    with torch.no_grad():
        ref = base(input_ids=ids).logits
        got = ours(input_ids=ids).logits
    tol = tol_for(dtype)
    assert rel_err(got, ref) < tol
    loss_ref = train_step(base, ids)
    loss_got = train_step(ours, ids)
    assert rel_err(loss_got, loss_ref) < tol
    p_ref, p_got = dict(base.named_parameters()), dict(ours.named_parameters())
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj",
                 "model.layers.0.mlp.gate.weight", "model.embed_tokens.weight"):
        assert rel_err(p_got[name], p_ref[name]) < tol * 0.1 + 1e-6, name
