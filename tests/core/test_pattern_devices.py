"""Patterns per device: captured tables follow ``device`` (and the index tensors), and FlexAttention's
block-mask builder accepts every mask_mod there and agrees with the analytic block layout."""
from __future__ import annotations

import pytest
import torch

import attnlab as al

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
    ),
]

CASES = [
    (al.sliding_window(9, causal=True), 200, 300),
    (al.prefix_lm(17), 300, 200),
    (al.document([50, 120, 86]), 256, 256),
    (al.document([50, 120, 86]) & al.causal(), 256, 256),
    (al.block_sparse(torch.rand(4, 3) < 0.5, 64), 200, 150),
    (al.neighborhood((16, 20), 5, dilation=(1, 2), stride=(2, 1), causal=(False, True)), 320, 320),
    (al.neighborhood((16, 20), (5, 7)).permuted(), 320, 320),
    (al.blocked((6, 8, 7), 3, 1).permuted(), 336, 336),
    (~al.neighborhood((16, 20), 5) | al.causal(), 320, 320),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p, n_q, n_kv", CASES, ids=[repr(c[0])[:40] for c in CASES])
def test_mask_on_device_equals_cpu(p, n_q, n_kv, device):
    assert torch.equal(p.mask(n_q, n_kv, device=device).cpu(), p.mask(n_q, n_kv))
    # A caller that passes no device still works: tables move to the index tensors' device.
    q = torch.arange(n_q, device=device)[:, None]
    k = torch.arange(n_kv, device=device)[None, :]
    zero = torch.zeros((), dtype=torch.long, device=device)
    got = p.mask_mod(n_q, n_kv)(zero, zero, q, k).expand(n_q, n_kv)
    assert torch.equal(got.cpu(), p.mask(n_q, n_kv))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p, n_q, n_kv", CASES, ids=[repr(c[0])[:40] for c in CASES])
def test_flex_block_mask_matches_layout(p, n_q, n_kv, device):
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    mod = p.mask_mod(n_q, n_kv, device)
    bm = flex.create_block_mask(mod, None, None, n_q, n_kv, device=device, BLOCK_SIZE=64)
    layout = p.block_layout(n_q, n_kv, 64, 64)
    dense = bm.to_dense()[0, 0].cpu().bool()  # (Qb, Kb): tiles flex will visit
    want = layout.full | layout.partial
    assert torch.equal(dense, want), repr(p)
