"""Softmax attention under a local pattern for mechanisms that train: ``attnlab.attention`` with a
kernel that has a backward pass.

Two of the kernels ``attnlab.attention`` picks are forward-only: compiled FlexAttention on CPU (for
large 2-D patterns; it would warn and fall back after a compile) and attnlab's Triton kernel on
CUDA. When gradients are needed this helper goes straight to a differentiable kernel instead: on
CPU, SDPA with the dense mask while the (Nq, Nk) mask is small, else attnlab's exact chunked kernel
(memory O(chunk x Nk)); on CUDA, FlexAttention (which has a GPU backward).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..core.patterns import Pattern
from ..kernels import attention
from ..kernels.attention import choose_kernel

DENSE_MASK_MAX = 1 << 24  # Nq * Nk up to which a dense bool mask (16 MB) is cheaper than chunking


def local_attention(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, scale: float | None = None) -> Tensor:
    """softmax(q k^T * scale, masked by ``pattern``) v through attnlab's kernels.

    q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv) -> (B, H, Nq, Dv). Rows seeing no key are 0.
    """
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    choice = choose_kernel(q, k, pattern) if needs_grad else "auto"
    if choice == "flex" and q.device.type == "cpu":
        kernel = "sdpa" if q.shape[2] * k.shape[2] <= DENSE_MASK_MAX else "chunked"
        return attention(q, k, v, pattern=pattern, scale=scale, kernel=kernel)
    return attention(q, k, v, pattern=pattern, scale=scale)  # auto: forward-only CUDA kernels yield to flex
