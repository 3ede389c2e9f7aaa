"""fusedmoe: the Qwen3-MoE MLP block — router, token permutation fused into grouped GEMMs, SiLU·mul,
un-permutation and the top-k weighted sum — forward and backward, on Hopper GPUs and on the CPU.

    blk = fusedmoe.Qwen3MoeFusedGroupedGEMMBlock.from_hf(hf_moe_block)
    hidden, router_logits = blk(hidden_states)            # [B,S,H] -> ([B,S,H], [B·S,E])
    y = fusedmoe.grouped_gemm(X, W, m_sizes, topk, gather_indices, permute_x=True)
"""
from . import _C
from ._ops import dtype_name
from .block import Qwen3MoeFusedGroupedGEMMBlock
from .functional import grouped_gemm, route, sort_by_expert
from .hf import patch_model, register_experts_implementation
from .kernel_config import KernelConfigBackward_dW, KernelConfigBackward_dX, KernelConfigForward

__version__ = _C.version()
cuda_available = _C.cuda_available
# The CUDA backend keeps its scratch memory's pages between calls (as torch's caching allocator does);
# this hands them back to the driver, like torch.cuda.empty_cache() for torch's own cache.
release_scratch_memory = _C.release_scratch_memory

# Makes experts_implementation="fusedmoe" available to transformers models (when transformers is installed).
register_experts_implementation()

__all__ = [
    "Qwen3MoeFusedGroupedGEMMBlock", "grouped_gemm", "route", "sort_by_expert", "patch_model",
    "register_experts_implementation", "KernelConfigForward", "KernelConfigBackward_dX", "KernelConfigBackward_dW",
    "cuda_available", "dtype_name", "release_scratch_memory",
]
