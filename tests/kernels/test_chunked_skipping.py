"""The exact chunked kernel visits only the key blocks a pattern's layout marks visible."""
from __future__ import annotations

import pytest
import torch

from attnlab import reference
from attnlab.core.patterns import blocked, causal, neighborhood, sliding_window
from attnlab.kernels.chunked import KV_BLOCK, chunked_attention

from kernel_helpers import random_qkv


@pytest.mark.parametrize(
    "pattern,n",
    [
        (sliding_window(17), 500),  # contiguous key span per chunk: a slice
        (causal(), 300),
        (neighborhood((16, 32), (3, 7), stride=(1, 2)), 512),  # 2-D: a band of grid rows
        (blocked((16, 32), 4, 2), 512),
        (neighborhood((64, 8), 3, dilation=(8, 1)), 512),  # dilation: gaps -> gathered blocks
    ],
    ids=repr,
)
def test_chunked_never_reads_keys_a_chunk_cannot_see(pattern, n):
    """For each query chunk, poison with NaN the values of every key block (of KV_BLOCK keys) that no
    query of the chunk may see: a kernel that multiplies them by a zero probability returns NaN there;
    one that skips those blocks matches the float64 reference computed on clean values."""
    chunk = 64
    q, k, v = random_qkv(1, 4, 2, n, n, 16, 16, torch.float32, seed=3)
    mask = pattern.mask(n, n)
    ref = reference.attention(q, k, v, pattern=pattern)
    skipped = 0
    for q0 in range(0, n, chunk):
        seen = mask[q0:q0 + chunk].any(0)
        block = torch.arange(n) // KV_BLOCK
        seen_block = torch.zeros(int(block[-1]) + 1).index_add_(0, block, seen.float()) > 0
        unseen = ~seen_block[block]
        skipped += int(unseen.sum())
        poisoned = v.clone()
        poisoned[:, :, unseen] = float("nan")
        out = chunked_attention(q, k, poisoned, pattern=pattern, scale=16 ** -0.5, chunk=chunk)
        torch.testing.assert_close(out[:, :, q0:q0 + chunk].double(), ref[:, :, q0:q0 + chunk], rtol=1e-5, atol=1e-5)
    assert skipped > 0  # the case really has keys to skip
