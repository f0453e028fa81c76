"""attnlab's Triton kernel for causal lightning attention (forward), with the per-head decay.

Paper: "Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large
Language Models" (Qin et al., 2024), the tiling used by "Various Lengths, Constant Speed: Efficient
Language Modeling with Lightning Attention" (paper 46). It computes::

    O = [(Q K^T) * M] V,    M[t, s] = lambda_h ** (t - s) if s <= t else 0,   lambda_h = exp(-rate_h)

in one launch. One program owns one (batch, head) and one tile of value columns and walks the
sequence block by block: inside a block the masked product ``(Q_i K_i^T * M) V_i`` (intra), plus
``(Lambda Q_i) KV`` from the running state KV (D, Dv-tile) of the blocks before it (inter), then
``KV <- lambda^B KV + (lambda^(B-1-s) K_i)^T V_i``. The state stays in registers in float32 for
the whole walk, so device memory sees each of q, k, v read once per value tile and o written once:
time is linear in N, with no (N, N) or per-block state tensors.

Measured on an H200 (benchmarks/results/h200_lightning_triton.md; B=4, H=32, D=128, bf16, decay):
0.065 ms at 1K (causal SDPA 0.088 ms, 1.36x), 0.23 ms at 4K (SDPA 1.04 ms, 4.6x), 3.8 ms at 64K
(SDPA 243 ms, 64x); 0.055-0.063 us per token from 1K to 64K (max/min 1.15; 1.20-1.21 in two
earlier runs); the PyTorch block loop took 0.84 ms at 1K and 37 ms at 64K.

Shapes: q, k (B, H, N, D), v (B, H, N, Dv); float16, bfloat16 (tensor-core dots, float32
accumulation and state) or float32 (3-pass tf32 dots, float32 accuracy on the tensor cores).
CUDA only; with ``TRITON_INTERPRET=1`` it also runs on CPU tensors (slowly: for tests of the
indexing).
"""
from __future__ import annotations

import functools

import torch

MAX_HEAD_DIM = 256


@functools.lru_cache(maxsize=None)
def _kernel():
    from .triton_lightning_kernel import lightning_fwd

    return lightning_fwd


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def available() -> bool:
    """True when Triton imports (the kernel itself also needs a CUDA device)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """None when ``lightning_forward`` can run this call, else the reason it cannot (for dispatch)."""
    if q.device.type != "cuda" and not _interpreting():
        return f"the Triton kernel runs on CUDA only; got device {q.device}"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not (q.dtype == k.dtype == v.dtype):
        return f"the Triton kernel takes one of float16, bfloat16, float32; got {q.dtype}, {k.dtype}, {v.dtype}"
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return f"the Triton kernel takes head dims <= {MAX_HEAD_DIM}; got D={q.shape[-1]}, Dv={v.shape[-1]}"
    if not available():
        return "Triton is not installed"
    return None


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_config(n: int, d: int, dv: int, dtype: torch.dtype, bh: int = 128, sms: int = 132) -> dict:
    """Tile sizes and launch options: tokens per block, value columns per program, warps, stages.

    16-bit inputs with head dims <= 128: 64-token blocks (the paper's B), 64 value columns per
    program, 4 warps, 2 stages; 255 registers and no spills (ptxas, sm_90, mask formed in the
    loop), so two programs share a multiprocessor: at B=4, H=32, Dv=128 all 256 programs run in one
    wave on the H200's 132. This was the fastest configuration at 1K, 4K and 16K tokens in three
    H200 sweeps (8 warps: 1.7x slower, one program per multiprocessor;
    benchmarks/results/h200_lightning_triton*.md). Few heads: while batch x heads (``bh``) x value
    tiles is at most half of ``sms``, the value tile halves (down to 16 columns), so more programs
    walk the sequence side by side at the cost of re-reading Q and K (H200, N=4K-16K: B=1 H=16
    0.58 -> 0.41 ms at 16 columns, B=1 H=32 0.15 -> 0.13 ms at 32). Larger head dims and float32
    (whose 3-pass tf32 dots hold split operands) take smaller tiles to keep spills small (their
    speed is not measured).
    """
    if dtype == torch.float32:
        cfg = {"BLOCK": 16, "BLOCK_DV": 32, "num_warps": 4, "num_stages": 1}
    elif max(d, dv) <= 128:
        cfg = {"BLOCK": 64, "BLOCK_DV": 64, "num_warps": 4, "num_stages": 2}
    else:
        cfg = {"BLOCK": 32, "BLOCK_DV": 32, "num_warps": 4, "num_stages": 2}
    cfg["BLOCK"] = min(cfg["BLOCK"], max(16, _next_pow2(n)))
    cfg["BLOCK_DV"] = min(cfg["BLOCK_DV"], max(16, _next_pow2(dv)))
    while cfg["BLOCK_DV"] > 16 and 2 * bh * -(-dv // cfg["BLOCK_DV"]) <= sms:
        cfg["BLOCK_DV"] //= 2
    return cfg


@functools.lru_cache(maxsize=32)
def _rates_on(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def _rates(decay: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(H,) float32 rates on the kernel's device; a CPU tensor is copied once per distinct value set."""
    if decay.device == device:
        return decay.to(torch.float32).contiguous()
    return _rates_on(tuple(decay.double().tolist()), device)


def lightning_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor | None = None,
    *,
    block: int | None = None,
    block_dv: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    out: torch.Tensor | None = None,
    e_first: bool = False,
    mask_in_loop: bool = True,
) -> torch.Tensor:
    """Causal lightning attention ``[(Q K^T) * M] V`` through the Triton kernel (forward only).

    Args:
        q: (B, H, N, D) queries (already through the feature map; no 1/sqrt(D) scale is applied).
        k: (B, H, N, D) keys.
        v: (B, H, N, Dv) values.
        decay: (H,) non-negative rates, ``lambda_h = exp(-rate_h)``, or None (no decay).

    Other Parameters:
        block: tokens per block (power of two >= 16); block_dv: value columns per program (power of
            two >= 16); num_warps, num_stages: Triton launch options. Defaults: ``default_config``.
        out: optional (B, H, N, Dv) output buffer in q's dtype.
        e_first: launch the value tiles of one head as neighbouring programs, for L2 reuse of Q, K
            (measured neutral on the H200: 0.222 vs 0.223 ms at 4K; kept as an option).
        mask_in_loop: form the decayed causal mask of a block inside the loop (exp per step) rather
            than keeping it in registers across the walk (frees 32 registers a thread: no spills;
            measured neutral on the H200, 0.224 vs 0.225 ms at 4K).

    Returns:
        (B, H, N, Dv) in q's dtype. No autograd: callers needing gradients use the PyTorch path.
    """
    reason = supports(q, k, v)
    if reason is not None:
        raise NotImplementedError(reason)
    b, h, n, d = q.shape
    dv = v.shape[-1]
    if k.shape != (b, h, n, d) or v.shape[:3] != (b, h, n):
        raise ValueError(f"q, k must be (B, H, N, D) and v (B, H, N, Dv) alike; got {q.shape=}, {k.shape=}, {v.shape=}")
    if decay is not None and decay.shape != (h,):
        raise ValueError(f"`decay` must be (H,) rates with H={h}; got {tuple(decay.shape)=}")
    if out is not None and (out.shape != (b, h, n, dv) or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(f"`out` must be ({b}, {h}, {n}, {dv}) {q.dtype} on {q.device}; got {out.shape=}, {out.dtype=}")
    cfg = default_config(n, d, dv, q.dtype, b * h, _sm_count(q.device))
    block = block or cfg["BLOCK"]
    block_dv = block_dv or cfg["BLOCK_DV"]
    for name, val in (("block", block), ("block_dv", block_dv)):
        if val < 16 or val & (val - 1):
            raise ValueError(f"`{name}` must be a power of two >= 16 (tl.dot tiles); got {name}={val}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if out is None:
        out = torch.empty(b, h, n, dv, dtype=q.dtype, device=q.device)
    rates = q.new_zeros(1, dtype=torch.float32) if decay is None else _rates(decay, q.device)
    block_d = max(16, _next_pow2(d))
    block_dv = min(block_dv, max(16, _next_pow2(dv)))
    grid = (-(-dv // block_dv), b * h) if e_first else (b * h, -(-dv // block_dv))
    _kernel()[grid](
        q, k, v, out, rates,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        n, h,
        D=d, DV=dv, BLOCK=block, BLOCK_D=block_d, BLOCK_DV=block_dv,
        DECAY=decay is not None, EVEN_N=n % block == 0, E_FIRST=e_first, MASK_IN_LOOP=mask_in_loop,
        PREC="tf32x3" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or cfg["num_stages"],
    )
    return out
