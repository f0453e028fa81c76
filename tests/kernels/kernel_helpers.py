"""Shared helpers for the kernel tests."""
import torch


def random_qkv(b, hq, hkv, n_q, n_kv, d, dv, dtype=torch.float32, seed=0):
    """Seeded q (b, hq, n_q, d), k (b, hkv, n_kv, d), v (b, hkv, n_kv, dv), drawn in float32 then cast."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, n_q, d, generator=g)
    k = torch.randn(b, hkv, n_kv, d, generator=g)
    v = torch.randn(b, hkv, n_kv, dv, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)
