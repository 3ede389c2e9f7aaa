"""Kernel configs select the CUDA kernels; autotune=True searches them once and caches the choice on disk."""
import json
import os
import subprocess
import sys

import pytest
import torch

import fusedmoe
from fusedmoe import autotune
from fusedmoe.kernel_config import FAMILIES, PORTABLE_TILE, kernels_arg

from conftest import dtype_for, rel_err


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEDMOE_CACHE_DIR", str(tmp_path))
    autotune._memo.clear()
    yield tmp_path
    autotune._memo.clear()


def test_configs_validate_and_map_to_the_cpp_tiling():
    fwd = fusedmoe.KernelConfigForward()  # the wide wgmma tile
    assert fwd.tiling() == [1, 256, 1]
    assert fusedmoe.KernelConfigForward(128, 128, 64, 6, 12, cluster_m=2).tiling() == [1, 128, 2]
    assert fusedmoe.KernelConfigBackward_dW(*PORTABLE_TILE).tiling() == [2, 128, 1]
    for name, cls in FAMILIES:
        for c in cls.search_space():
            assert cls.from_tiling(c.tiling()) == c
    assert len(fusedmoe.KernelConfigForward.search_space()) == 4
    assert len(fusedmoe.KernelConfigBackward_dW.search_space()) == 2  # no multicast for dW
    with pytest.raises(ValueError, match="cluster_m must be 1 for the dW GEMMs"):
        fusedmoe.KernelConfigBackward_dW(cluster_m=2)
    with pytest.raises(ValueError, match="cluster_m must be 1 for the portable kernel"):
        fusedmoe.KernelConfigForward(*PORTABLE_TILE, cluster_m=2)
    with pytest.raises(ValueError, match="cluster_m must be a positive int"):
        fusedmoe.KernelConfigForward(cluster_m=0)
    with pytest.raises(ValueError, match="not implemented by the CUDA backend"):
        fusedmoe.KernelConfigBackward_dX(BLOCK_SIZE_N=192)
    assert kernels_arg() == []
    assert kernels_arg(None, fusedmoe.KernelConfigBackward_dX(cluster_m=2), None) == [0, 0, 0, 1, 256, 2, 0, 0, 0]


def _block(device, dtype, H=64, I=48, E=8, k=2, **kw):
    torch.manual_seed(0)
    cfg = dict(num_experts=E, num_experts_per_tok=k, norm_topk_prob=True, hidden_size=H, moe_intermediate_size=I,
               hidden_act="silu")
    cfg = type("Cfg", (), cfg)()
    gate = torch.randn(E, H, device=device, dtype=dtype) * H ** -0.5
    w1 = torch.randn(E, 2 * I, H, device=device, dtype=dtype) * H ** -0.5
    w2 = torch.randn(E, H, I, device=device, dtype=dtype) * I ** -0.5
    return fusedmoe.Qwen3MoeFusedGroupedGEMMBlock(cfg, gate, w1, w2, **kw)


def _run(blk, x):
    x = x.clone().requires_grad_(True)
    out, _ = blk(x)
    out.float().square().sum().backward()
    grads = [x.grad, blk.gate.grad, blk.gate_up_proj.grad, blk.down_proj.grad]
    for p in blk.parameters():
        p.grad = None
    return [out] + grads


CHOICES = [
    (fusedmoe.KernelConfigForward(*PORTABLE_TILE), fusedmoe.KernelConfigBackward_dX(*PORTABLE_TILE),
     fusedmoe.KernelConfigBackward_dW(*PORTABLE_TILE)),
    (fusedmoe.KernelConfigForward(cluster_m=2), fusedmoe.KernelConfigBackward_dX(128, 128, 64, 6, 12),
     fusedmoe.KernelConfigBackward_dW()),
    (fusedmoe.KernelConfigForward(128, 128, 64, 6, 12, cluster_m=2), fusedmoe.KernelConfigBackward_dX(cluster_m=2),
     fusedmoe.KernelConfigBackward_dW(128, 128, 64, 6, 12)),
]


@pytest.mark.parametrize("choice", range(len(CHOICES)))
def test_every_kernel_choice_computes_the_same_block(device, choice):
    dtype = dtype_for(device)
    fwd, dx, dw = CHOICES[choice]
    ref = _block(device, dtype, autotune=False)
    blk = _block(device, dtype, autotune=False, kernel_config_fwd=fwd, kernel_config_bwd_dX=dx,
                 kernel_config_bwd_dW=dw)
    assert blk.kernels_for(torch.empty(1, 64, device=device, dtype=dtype), blk.gate, blk.gate_up_proj,
                           blk.down_proj) == fwd.tiling() + dx.tiling() + dw.tiling()
    x = torch.randn(2, 150, 64, device=device, dtype=dtype)  # 300 tokens · 2 / 8 experts: ~75 rows each
    for a, b in zip(_run(blk, x), _run(ref, x)):
        assert rel_err(a, b) <= (1e-6 if device.type == "cpu" else 1e-2)
    # The unfused path (separate grouped GEMMs) takes the same configs.
    unfused = _block(device, dtype, autotune=False, permute_x=False, kernel_config_fwd=fwd, kernel_config_bwd_dX=dx,
                     kernel_config_bwd_dW=dw)
    for a, b in zip(_run(unfused, x), _run(ref, x)):
        assert rel_err(a, b) <= (1e-6 if device.type == "cpu" else 3e-2)


@pytest.mark.skipif(not (torch.cuda.is_available() and fusedmoe.cuda_available()), reason="needs the CUDA backend")
def test_an_explicit_wgmma_choice_the_problem_cannot_take_is_an_error():
    blk = _block("cuda", torch.bfloat16, H=62, I=20, autotune=False,
                 kernel_config_fwd=fusedmoe.KernelConfigForward())  # 124-byte rows: not 16-byte multiples
    with pytest.raises(ValueError, match="wgmma"):
        blk(torch.randn(1, 10, 62, device="cuda", dtype=torch.bfloat16))


def test_autotune_searches_once_and_caches_on_disk(cache_dir):
    x = torch.randn(100, 64)
    w1, w2 = torch.randn(8, 96, 64), torch.randn(8, 64, 48)
    calls = []

    def fake_measure(choice, phase):  # pretends the 128-wide pair tile is fastest for every family
        assert phase == ("forward" if len(calls) < 6 else "backward")
        calls.append(dict(choice))
        return sum(0.0 if t == [1, 128, 2] or t == [1, 128, 1] and n == "bwd_dW" else 1.0
                   for n, t in choice.items())

    got = autotune.tuned_choice(x, None, w1, w2, 2, True, measure=fake_measure)
    assert got == {"fwd": [1, 128, 2], "bwd_dX": [1, 128, 2], "bwd_dW": [1, 128, 1]}
    # Per family: the heuristic, the search space, and the incumbent again after the winning candidate.
    assert len(calls) == (1 + 4 + 1) + (1 + 4 + 1) + (1 + 2 + 1)
    data = json.loads((cache_dir / autotune.CACHE_FILE).read_text())
    (key, stored), = data.items()
    assert stored == got and "|H64|I48|E8|k2|T128|float32|dW|fusedmoe-" in key

    # Same process, same bucket (T=100 and T=128 share it): no new search.
    def must_not_run(choice, phase):
        raise AssertionError("re-tuned a cached problem")
    assert autotune.tuned_choice(torch.randn(128, 64), None, w1, w2, 2, True, measure=must_not_run) == got
    # A second process reads the file and does not tune either.
    code = ("import json, torch; from fusedmoe import autotune\n"
            "def no(c, p): raise AssertionError('re-tuned')\n"
            "print(json.dumps(autotune.tuned_choice(torch.randn(100, 64), None, torch.randn(8, 96, 64),"
            " torch.randn(8, 64, 48), 2, True, measure=no)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ), check=True)
    assert json.loads(out.stdout) == got
    # Another bucket, another search; a frozen-experts problem has no dW family to tune.
    calls.clear()
    frozen = autotune.tuned_choice(torch.randn(300, 64), None, w1, w2, 2, True, with_dw=False, measure=fake_measure)
    assert len(calls) == 12 and frozen["bwd_dW"] is None
    assert len(json.loads((cache_dir / autotune.CACHE_FILE).read_text())) == 2


def test_autotune_keeps_the_heuristic_unless_a_candidate_clearly_wins(cache_dir):
    # Candidates within the noise margin of the heuristic are not taken; a clear win is.
    def measure(choice, phase):
        t = 1.0
        if choice["fwd"] == [1, 128, 1]:
            t -= 0.02  # 2%: noise-sized
        if choice["bwd_dX"] == [1, 256, 2]:
            t -= 0.10  # 10%: real
        return t
    got = autotune.search(measure)
    assert got == {"fwd": None, "bwd_dX": [1, 256, 2], "bwd_dW": None}


def test_autotune_times_the_incumbent_again_before_a_candidate_wins(cache_dir):
    # A GPU whose clocks rise during the search makes every later timing shorter: the heuristic, timed first,
    # must not lose to a candidate that is no faster than the heuristic timed at the same moment.
    clock = iter(range(1000))

    def drifting(choice, phase):
        speedup = 1.0 - 0.01 * next(clock)  # 1% faster per timing
        return speedup * (0.95 if choice["bwd_dX"] == [1, 256, 1] else 1.0)
    got = autotune.search(drifting)
    assert got == {"fwd": None, "bwd_dX": [1, 256, 1], "bwd_dW": None}


@pytest.mark.skipif(not (torch.cuda.is_available() and fusedmoe.cuda_available()), reason="needs the CUDA backend")
def test_block_autotune_times_real_kernels_then_uses_the_cache(cache_dir):
    blk = _block("cuda", torch.bfloat16, H=256, I=128, autotune=True)
    x = torch.randn(1, 512, 256, device="cuda", dtype=torch.bfloat16)
    ref = _run(_block("cuda", torch.bfloat16, H=256, I=128, autotune=False), x)
    got = _run(blk, x)
    data = json.loads((cache_dir / autotune.CACHE_FILE).read_text())
    (choice,) = data.values()
    assert set(choice) == {"fwd", "bwd_dX", "bwd_dW"}
    assert blk.kernels_for(x.view(512, 256), blk.gate, blk.gate_up_proj, blk.down_proj) == kernels_arg(
        *[None if choice[n] is None else cls.from_tiling(choice[n]) for n, cls in FAMILIES])
    for a, b in zip(got, ref):
        assert rel_err(a, b) <= 1e-2
    # Frozen experts: a second problem (no dW family), timed with the real kernels too.
    frozen = _block("cuda", torch.bfloat16, H=256, I=128, autotune=True, dX_only=True)
    out = _run(frozen, x)
    assert rel_err(out[1], ref[1]) <= 1e-2  # dx
    choices = json.loads((cache_dir / autotune.CACHE_FILE).read_text())
    assert len(choices) == 2 and [c["bwd_dW"] for k, c in choices.items() if "|frozen|" in k] == [None]
