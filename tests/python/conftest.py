import pytest
import torch

import fusedmoe

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and fusedmoe.cuda_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def dtype_for(device):
    """The CPU backend is checked in float32 (tight), the CUDA backend in bfloat16 (its tensor-core dtype)."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def tol_for(dtype):
    return 2e-4 if dtype == torch.float32 else 2e-2


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
