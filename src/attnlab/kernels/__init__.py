"""Kernels: executing attention and its patterns (SDPA, FlexAttention, banded SDPA, exact chunked).

``attention`` is the public call (also ``attnlab.attention``); the modules beside it are the paths
it dispatches to.
"""
from .attention import KERNELS, attention, attention_with_lse, choose_kernel
from .triton_block_sparse import block_sparse_attention

__all__ = ["attention", "attention_with_lse", "choose_kernel", "KERNELS", "block_sparse_attention"]
