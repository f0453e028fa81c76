"""``attnlab.attention``: the one attention call, and how it picks a kernel.

Dispatch with ``kernel="auto"``:

1. no pattern, no score_mod -> SDPA (nothing added: dense through attnlab costs what SDPA costs);
2. ``causal()`` without score_mod -> SDPA ``is_causal`` (self) or a lower-right causal bias (cross);
3. float64 inputs with a pattern or score_mod -> the exact chunked kernel;
4. small calls on CPU (Nq * Nk <= SMALL) -> SDPA with a dense mask (pattern) or the chunked kernel
   (score_mod): compiling FlexAttention costs seconds on CPU, more than such a call ever will;
5. grouped dense SDPA (``grouped_dense.py``) when the queries share key windows in groups (strided
   neighborhoods, HaloNet blocks, non-causal documents): on CUDA for large 1-D calls (groups of >= 64
   queries, >= 0.3 TFLOP of work; ``grouped_fits``) that the Gluon kernel cannot run, on CPU for any
   grid with groups of >= 16;
6. CUDA, no gradient needed: on a Hopper GPU the warp-specialized Gluon kernel (``gluon_local.py``,
   ``kernel="gluon"``) for interval-separable 1-D/2-D patterns unless its tiles waste much more than the
   Triton kernel's; attnlab's Triton kernels (``kernel="triton"``) where they support the pattern
   (interval-separable local patterns; ``block_sparse`` layouts, also ``& causal()``), else compiled
   FlexAttention (also when q, k or v requires grad: those kernels are forward only);
7. CPU: the banded SDPA path when the pattern's key spans are narrow and most query blocks share
   one mask at a constant stride (1-D windows), else compiled FlexAttention;
8. if FlexAttention fails (unsupported head dim or dtype, no compiler), the exact chunked kernel,
   with a warning that says why.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

from ..core.checks import check_qkv, default_scale
from ..core.patterns import Causal, Pattern
from . import banded as _banded
from . import chunked as _chunked
from . import flex as _flex
from . import grouped_dense as _grouped
from . import sdpa as _sdpa

KERNELS = ("auto", "sdpa", "flex", "chunked", "banded", "triton", "gluon", "grouped")
SMALL = 1 << 18  # Nq * Nk at or below which CPU calls skip FlexAttention's compile
# Work (FLOP) from which grouped dense beats the Triton kernel on CUDA: measured on an H200, 0.14 TFLOP
# tied (1-D HaloNet at 32K) and 0.07 TFLOP lost, 0.55 TFLOP and more won (h200_kernels_s4.md).
CUDA_GROUPED_MIN_FLOP = 3e11

_flex_failed: dict[tuple, str] = {}  # (device, dtype, D, Dv, pattern, score_mod?) -> why flex failed


def _check(pattern, score_mod, kernel) -> None:
    if pattern is not None and not isinstance(pattern, Pattern):
        raise ValueError(f"`pattern` must be an attnlab Pattern or None; got {type(pattern).__name__}: {pattern=}")
    if score_mod is not None and not callable(score_mod):
        raise ValueError(f"`score_mod` must be callable f(score, b, h, q_idx, kv_idx) or None; got {score_mod=}")
    if kernel not in KERNELS:
        raise ValueError(f"`kernel` must be one of {KERNELS}; got {kernel=}")


def _triton(q, k, v, pattern, scale):
    """attnlab's Triton kernels (CUDA): block-sparse layouts (``block_sparse``, ``& causal()``) run on the
    tile-list kernel, interval-separable patterns on the local one. Raises NotImplementedError with a
    reason when unsupported."""
    try:
        from . import triton_block_sparse
        from .triton_local import run_pattern
    except ImportError as e:
        raise NotImplementedError(f"the Triton kernel is not available ({e})") from e
    if triton_block_sparse.supports(pattern):
        return triton_block_sparse.run_pattern(q, k, v, pattern, scale)
    return run_pattern(q, k, v, pattern, scale)


def _gluon(q, k, v, pattern, scale):
    """The warp-specialized Gluon kernel (Hopper); NotImplementedError with the reason elsewhere."""
    try:
        from . import gluon_local
    except ImportError as e:  # no Triton at all
        raise NotImplementedError(f"the Gluon kernel is not available ({e})") from e
    return gluon_local.run_pattern(q, k, v, pattern, scale)


def _flex_or_chunked(q, k, v, pattern, scale, score_mod):
    # A compile failure can come from the inputs (dtype, head dim) or from one pattern's mask_mod:
    # remember it for that combination only.
    key = (q.device.type, q.dtype, q.shape[-1], v.shape[-1], pattern, score_mod is not None)
    _flex.prepare(pattern, q.shape[2], k.shape[2], q.device)  # the pattern's own errors reach the caller
    if key not in _flex_failed:
        try:
            return _flex.flex(q, k, v, pattern, scale, score_mod)
        except Exception as e:  # compile/lowering errors have many types; the message says which
            _flex_failed[key] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            warnings.warn(
                f"FlexAttention cannot run {key} ({_flex_failed[key]}); using attnlab's exact chunked kernel",
                RuntimeWarning,
                stacklevel=3,
            )
    return _chunked.chunked_attention(q, k, v, pattern=pattern, scale=scale, score_mod=score_mod)


def choose_kernel(q: torch.Tensor, k: torch.Tensor, pattern=None, score_mod=None) -> str:
    """The kernel ``kernel="auto"`` runs for these inputs (before any fallback): one of KERNELS[1:].

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D). The rules are in this module's docstring.
    """
    if score_mod is None and (pattern is None or isinstance(pattern, Causal)):
        return "sdpa"
    small = q.shape[2] * k.shape[2] <= SMALL and q.device.type != "cuda"
    if q.dtype == torch.float64 or (small and score_mod is not None):
        return "chunked"
    if small:
        return "sdpa"
    if score_mod is None and q.device.type == "cuda" and _gluon_preferred(q, k, pattern):
        return "gluon"  # ahead of grouped dense: 1-D strided NA at 32K, Gluon 0.96 of ideal, grouped 0.82
    if score_mod is None and _grouped_fits(q, k, pattern):
        return "grouped"
    if score_mod is None and q.device.type == "cuda" and _triton_available():
        return "triton"
    if score_mod is None and q.device.type != "cuda":
        band = _banded.plan(pattern, q.shape[2], k.shape[2], q.device)
        # Mostly gathered blocks (2-D grids: each block's mask differs) lose to FlexAttention,
        # unless there are few of them (decoding, short queries against long keys).
        if band is not None and (band.strided_fraction >= 0.5 or band.gathered_blocks <= 8):
            return "banded"
    return "flex"


def _grouped_fits(q: torch.Tensor, k: torch.Tensor, pattern) -> bool:
    cuda = q.device.type == "cuda"
    plan = _grouped.plan(pattern, q.shape[2], k.shape[2], min_group=64 if cuda else 16)
    return grouped_fits(plan, q.shape[0], q.shape[1], q.shape[-1], cuda)


def grouped_fits(plan, batch: int, heads: int, head_dim: int, cuda: bool) -> bool:
    """Whether auto mode runs a grouped-dense plan (``grouped_dense.plan``; None: never).

    CPU: always (1.1-5.4x faster than FlexAttention / banded on 2 cores, benchmarks/results/cpu_grouped.md).
    CUDA (benchmarks/results/h200_kernels_s4.md): 1-D grids only (n-D gathers cost more than the
    Triton kernel's whole run), at most 8 classes, and at least CUDA_GROUPED_MIN_FLOP of work: each
    class is an SDPA launch plus a copy with ~80 us of host work, so small calls (4K-8K tokens) lose
    to the Triton kernel's single launch, while at 32K grouped dense wins (0.82-0.97 vs 0.73-0.78).
    """
    if plan is None:
        return False
    if not cuda:
        return True
    flop = 4 * plan.pairs * batch * heads * head_dim
    return len(plan.q_grid) == 1 and len(plan.classes) <= 8 and flop >= CUDA_GROUPED_MIN_FLOP


def _gluon_preferred(q: torch.Tensor, k: torch.Tensor, pattern) -> bool:
    try:
        from .gluon_local import preferred
    except ImportError:
        return False
    return preferred(q, k, pattern)


def _triton_available() -> bool:
    try:
        from .triton_local import run_pattern  # noqa: F401
    except ImportError:
        return False
    return True


def _auto(q, k, v, pattern, scale, score_mod):
    kernel = choose_kernel(q, k, pattern, score_mod)
    if kernel in ("triton", "gluon") and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        kernel = "flex"  # the Triton and Gluon kernels are forward only; FlexAttention has a backward on CUDA
    if kernel == "gluon":
        try:
            return _gluon(q, k, v, pattern, scale)
        except NotImplementedError:
            kernel = "triton"
    if kernel == "triton":
        try:
            return _triton(q, k, v, pattern, scale)
        except NotImplementedError:  # e.g. dilated or non-interval patterns: FlexAttention runs them
            kernel = "flex"
    if kernel == "flex":
        return _flex_or_chunked(q, k, v, pattern, scale, score_mod)
    if kernel == "banded":
        return _banded.banded(q, k, v, pattern, scale, _banded.plan(pattern, q.shape[2], k.shape[2], q.device))
    return _forced(q, k, v, pattern, scale, score_mod, kernel)


def _forced(q, k, v, pattern, scale, score_mod, kernel):
    if kernel == "chunked":
        return _chunked.chunked_attention(q, k, v, pattern=pattern, scale=scale, score_mod=score_mod)
    if kernel == "flex":
        return _flex.flex(q, k, v, pattern, scale, score_mod)
    if score_mod is not None:
        raise ValueError(f"kernel={kernel!r} takes no `score_mod`; use kernel='flex' or 'chunked' (or 'auto')")
    if kernel == "sdpa":
        if pattern is None:
            return _sdpa.dense(q, k, v, scale)
        if isinstance(pattern, Causal):
            return _sdpa.causal(q, k, v, scale)
        return _sdpa.masked(q, k, v, pattern, scale)
    if pattern is None:
        raise ValueError(f"kernel={kernel!r} needs a `pattern`; got pattern=None (use kernel='sdpa' or 'auto')")
    if kernel == "banded":
        band = _banded.plan(pattern, q.shape[2], k.shape[2], q.device, max_work=float("inf"))
        return _banded.banded(q, k, v, pattern, scale, band)
    if kernel == "grouped":
        try:
            return _grouped.run_pattern(q, k, v, pattern, scale)
        except NotImplementedError as e:
            raise ValueError(f"kernel='grouped' cannot run this call: {e}") from e
    if kernel == "gluon":
        try:
            return _gluon(q, k, v, pattern, scale)
        except NotImplementedError as e:
            raise ValueError(f"kernel='gluon' cannot run this call: {e}") from e
    try:  # kernel == "triton"
        return _triton(q, k, v, pattern, scale)
    except NotImplementedError as e:
        raise ValueError(f"kernel='triton' cannot run this call: {e}") from e


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    pattern: Pattern | None = None,
    scale: float | None = None,
    score_mod: Callable | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """Attention ``softmax(q k^T * scale + score_mod, masked by pattern) v``, on the fastest exact kernel.

    The four attention patterns of the CAB benchmark: noncausal self (``pattern=None``, Nq == Nk),
    noncausal cross (``pattern=None``, Nq != Nk), causal self (``pattern=causal()``) and causal
    cross (``causal()`` with Nq != Nk). Cross attention is aligned bottom-right, as in
    FlashAttention >= 2.1: query i sits at key position ``i + (Nk - Nq)`` and, under ``causal()``,
    sees keys ``j <= i + (Nk - Nq)``. Any other attnlab Pattern (windows, neighborhoods, documents,
    block-sparse, ...) uses the same rule for its positions.

    Args:
        q: (B, Hq, Nq, D) queries.
        k: (B, Hkv, Nk, D) keys; Hq must be a multiple of Hkv (GQA/MQA: query head h uses key/value
            head h // (Hq // Hkv)).
        v: (B, Hkv, Nk, Dv) values; Dv may differ from D.
        pattern: which keys each query may see (an attnlab Pattern), or None for all of them.
        scale: multiplier of q k^T; default 1 / sqrt(D).
        score_mod: FlexAttention-style ``f(score, b, h, q_idx, kv_idx) -> score`` applied to the
            scaled scores before masking (e.g. an ALiBi bias). It must be written with tensor ops
            so that it both traces under torch.compile and broadcasts over index tensors.

    Other parameters:
        kernel: which implementation runs the call. ``"auto"`` (default) picks by the rules in this
            module's docstring. ``"sdpa"``: PyTorch SDPA (a pattern becomes a dense (Nq, Nk) mask;
            no score_mod). ``"flex"``: compiled FlexAttention with the pattern's block mask.
            ``"chunked"``: the exact float32-accumulating chunked kernel (any dtype, memory
            O(chunk x Nk)). ``"banded"``: one SDPA over each query block's key span (CPU fast path
            for windows; no score_mod). ``"triton"``: attnlab's Triton kernels (CUDA). ``"gluon"``:
            the warp-specialized Gluon kernel (Hopper GPUs, 1-D/2-D local patterns, forward only).
            ``"grouped"``: one dense SDPA per class of query groups that share a key window
            (interval-separable patterns; no score_mod). A forced kernel raises instead of
            falling back.

    Returns:
        (B, Hq, Nq, Dv) in q's dtype. Query rows that may see no key are zeros, never NaN.

    Supports float32, bfloat16 and float16 (and float64, through the chunked kernel or SDPA's
    math path) on CPU and CUDA. Forward only for patterns on CPU (FlexAttention's CPU backend has
    no backward).
    """
    check_qkv(q, k, v)
    scale = default_scale(q, scale)
    _check(pattern, score_mod, kernel)
    if kernel == "auto":
        return _auto(q, k, v, pattern, scale, score_mod)
    return _forced(q, k, v, pattern, scale, score_mod, kernel)


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    pattern: Pattern | None = None,
    scale: float | None = None,
    score_mod: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention`` plus the log-sum-exp of each query row, for merging partial attentions.

    Runs the exact chunked kernel. Shapes as in ``attention``; returns out (B, Hq, Nq, Dv) in q's
    dtype and lse (B, Hq, Nq) float32 (float64 for float64 inputs), natural log, over the scaled
    (and score-modified) visible scores; fully masked rows have out = 0 and lse = -inf.
    """
    check_qkv(q, k, v)
    scale = default_scale(q, scale)
    _check(pattern, score_mod, "chunked")
    return _chunked.chunked_attention(q, k, v, pattern=pattern, scale=scale, score_mod=score_mod, return_lse=True)
