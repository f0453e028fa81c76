"""reduce_layer (massive activations, one layer) against the rules written out directly, on random
hidden states with planted massive entries and padding."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.analysis.massive_activations import median_inplace_, reduce_layer


def _direct(h, real, ratio, floor, tau):
    a = h.abs()
    vals = a[real]
    med = float(vals.median())
    cut = max(ratio * med, floor)
    massive = [(b, n, d, float(h[b, n, d])) for b, n, d in ((a > cut) & real[..., None]).nonzero().tolist()]
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    rms = [(b, n, d, float(normed[b, n, d])) for b, n, d in ((normed.abs() > tau) & real[..., None]).nonzero().tolist()]
    return {"median_abs": med, "max_abs": float(vals.max()), "massive": massive, "rms_hits": rms}


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), n=st.integers(1, 40), d=st.integers(1, 70), n_planted=st.integers(0, 6),
       padded=st.booleans(), seed=st.integers(0, 2**16))
def test_reduce_layer_matches_direct_rules(b, n, d, n_planted, padded, seed):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(b, n, d, generator=gen)
    for _ in range(n_planted):  # a few huge entries, some on padded tokens (which must be ignored)
        i, j, k = (int(torch.randint(m, (1,), generator=gen)) for m in (b, n, d))
        h[i, j, k] = float(torch.randn(1, generator=gen)) * 1000
    real = torch.ones(b, n, dtype=torch.bool)
    if padded:
        real[:, : int(torch.randint(n, (1,), generator=gen))] = False
        real[0, -1] = True  # at least one real token
    got = reduce_layer(h.clone(), real, ratio=100.0, floor=10.0, tau=3.0)
    assert got == _direct(h, real, 100.0, 10.0, 3.0)


def test_median_inplace_is_torch_median_incl_ties_and_even_sizes():
    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 1000, 300_001):
        x = torch.randn(n, generator=gen).abs()
        if n > 2:
            x[: n // 3] = 0.25  # ties
        assert median_inplace_(x.clone()) == float(x.median())
