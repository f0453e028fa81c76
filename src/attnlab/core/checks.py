"""Argument checks for the attention call. Each raises ValueError naming the argument and the rule."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Validate SDPA-layout tensors: q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"`{name}` must have 4 dims (B, H, N, D) in SDPA layout; got {name}.shape={tuple(t.shape)}"
            )
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"`{name}` must be a floating tensor {FLOAT_DTYPES}; got {name}.dtype={t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype; got {q.dtype=}, {k.dtype=}, {v.dtype=}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device=}, {k.device=}, {v.device=}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"batch sizes differ: {q.shape[0]=}, {k.shape[0]=}, {v.shape[0]=}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must agree on (Hkv, Nk); got {tuple(k.shape)=} and {tuple(v.shape)=}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share head dim D; got {q.shape[-1]=} and {k.shape[-1]=}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"query heads must be a multiple of key/value heads (GQA/MQA); got Hq={q.shape[1]}, Hkv={k.shape[1]}"
        )
    if k.shape[2] == 0:
        raise ValueError(f"need at least one key; got Nk={k.shape[2]}")


def default_scale(q: torch.Tensor, scale: float | None) -> float:
    if scale is None:
        return q.shape[-1] ** -0.5
    if not isinstance(scale, (int, float)) or scale <= 0:
        raise ValueError(f"`scale` must be a positive number or None; got {scale=}")
    return float(scale)
