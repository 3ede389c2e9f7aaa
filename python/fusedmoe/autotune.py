"""Autotuning of the kernel choices, cached on disk.

`autotune=True` (the block's default) times the choices of each GEMM family (fusedmoe.kernel_config) on
the first call for a problem and keeps the fastest in a JSON file, keyed by GPU name, shapes, token
bucket, dtype and library version, so a second process never re-tunes. The search is a coordinate pass:
forward, then dX, then dW, each family timed over its search space (plus the heuristic) with the others
fixed at their best so far: forward candidates on the block's forward, dX and dW candidates on its backward
(median of 7 after a warm-up). A candidate replaces the shipped heuristic only when it is more than 3%
faster, so timing noise does not pick a slower kernel.

The cache lives in $FUSEDMOE_CACHE_DIR, else $XDG_CACHE_HOME/fusedmoe, else ~/.cache/fusedmoe. Nothing is
tuned on the CPU, while a CUDA graph is being captured or while torch.compile traces (a search there
would be captured with it): those calls use the cache if it has the key, else the heuristic.
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Callable, Optional

import torch

from ._ops import compiling
from .kernel_config import FAMILIES

CACHE_FILE = "autotune.json"
_lock = threading.Lock()
_memo: dict = {}  # key -> {family: [kernel, block_n, cluster_m] or None}


def cache_dir() -> Path:
    if os.environ.get("FUSEDMOE_CACHE_DIR"):
        return Path(os.environ["FUSEDMOE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fusedmoe"


def token_bucket(tokens: int) -> int:
    """Problems are tuned per power-of-two token count (the best tile changes with the rows per expert)."""
    return 1 << max(0, int(tokens) - 1).bit_length()


def cache_key(device_name: str, hidden: int, intermediate: int, experts: int, top_k: int, tokens: int,
              dtype: torch.dtype, with_dw: bool = True) -> str:
    from . import __version__
    return (f"{device_name}|H{hidden}|I{intermediate}|E{experts}|k{top_k}|T{token_bucket(tokens)}|"
            f"{str(dtype).replace('torch.', '')}|{'dW' if with_dw else 'frozen'}|fusedmoe-{__version__}")


def _read_cache() -> dict:
    path = cache_dir() / CACHE_FILE
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # missing or unreadable: tune again


def lookup(key: str) -> Optional[dict]:
    with _lock:
        if key in _memo:
            return _memo[key]
        entry = _read_cache().get(key)
        if isinstance(entry, dict):
            _memo[key] = entry
        return _memo.get(key)


def store(key: str, choice: dict) -> None:
    """Merges one entry into the cache file (write to a temporary file, then rename: readers never see half)."""
    with _lock:
        _memo[key] = choice
        directory = cache_dir()
        directory.mkdir(parents=True, exist_ok=True)
        data = _read_cache()
        data[key] = choice
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".autotune-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, directory / CACHE_FILE)


# A candidate replaces the heuristic only when it is this much faster: timings of a few milliseconds vary by
# a few percent from run to run, and a noise-driven pick costs as much as it seemed to gain (measured on the
# H200: picks made without a margin ran 2-13% slower than the heuristic at T = 1024…4096).
MARGIN = 0.03

# The part of the block each family's kernels run in, which is what its candidates are timed on.
PHASES = {"fwd": "forward", "bwd_dX": "backward", "bwd_dW": "backward"}


def search(measure: Callable[[dict, str], float], families=FAMILIES) -> dict:
    """Coordinate search over the families; measure(choice, phase) times the "forward" or the "backward" of
    a full choice {family: tiling or None}. The heuristic (None) stays unless a candidate beats it by MARGIN,
    against the incumbent timed again right after the candidate: clocks and load drift during a search (the
    first timings of a process often run on a GPU still raising its clocks), and a single early timing of the
    incumbent would let any later candidate win."""
    best = {name: None for name, _ in families}
    for name, cls in families:
        phase = PHASES[name]
        base = measure(best, phase)
        for cand in (c.tiling() for c in cls.search_space()):
            t = measure(dict(best, **{name: cand}), phase)
            if t < base * (1 - MARGIN):
                base = measure(best, phase)
                if t < base * (1 - MARGIN):
                    best[name], base = cand, t
    return best


def _tracing() -> bool:
    return compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def tuned_choice(x, gate, gate_up_proj, down_proj, top_k: int, norm_topk_prob: bool, with_dw: bool = True,
                 measure: Optional[Callable[[dict], float]] = None) -> Optional[dict]:
    """The cached or freshly tuned {family: tiling or None} for this problem; None where nothing is tuned."""
    if x.device.type != "cuda" and measure is None:
        return None
    E, two_i, H = gate_up_proj.shape
    name = torch.cuda.get_device_name(x.device) if x.device.type == "cuda" else "cpu"
    key = cache_key(name, H, two_i // 2, E, top_k, x.shape[0], x.dtype, with_dw)
    hit = lookup(key)
    if hit is not None or _tracing():
        return hit
    if measure is None:
        measure = _block_timer(x, gate, gate_up_proj, down_proj, top_k, norm_topk_prob, with_dw)
    choice = search(measure, FAMILIES if with_dw else FAMILIES[:2])  # frozen experts run no dW GEMM
    choice.setdefault("bwd_dW", None)
    store(key, choice)
    return choice


def _block_timer(x, gate, gate_up_proj, down_proj, top_k, norm, with_dw, repeats: int = 7):
    """Times the forward or the backward of the fused block ops (no autograd) for a choice: the median of
    `repeats` after a warm-up."""
    from . import _ops
    from .kernel_config import kernels_arg

    x = x.detach()
    d_out = torch.randn_like(x)

    def forward(kernels):
        return _ops.moe_forward(x, gate.detach(), gate_up_proj.detach(), down_proj.detach(), top_k, norm, kernels)

    def backward(kernels, out):
        _ops.moe_backward(d_out, x, gate.detach(), gate_up_proj.detach(), down_proj.detach(), out[1], *out[2:],
                          top_k, norm, True, True, with_dw, with_dw, kernels)

    def measure(choice: dict, phase: str) -> float:
        configs = [None if choice.get(n) is None else cls.from_tiling(choice[n]) for n, cls in FAMILIES]
        kernels = kernels_arg(*configs)
        out = forward(kernels)
        backward(kernels, out)  # warm-up (and first-launch set-up)
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            if phase == "forward":
                forward(kernels)
            else:
                backward(kernels, out)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]

    return measure
