"""Lightning attention: causal linear attention tiled into intra-block and inter-block parts.

Paper: "Various Lengths, Constant Speed: Efficient Language Modeling with Lightning Attention"
(Qin et al., 2024, arXiv 2405.17381; paper 46), the attention of TransNormerLLM.

The output is the causal linear attention with a per-head decay ``lambda`` (no softmax, no
normalising division; TransNormerLLM normalises the output with an RMSNorm instead)::

    O = [(Q K^T) * M] V,    M[t, s] = lambda ** (t - s) if s <= t else 0

Computed with the ``cumsum``-free tiling of the paper: the sequence is cut into blocks of
``block`` tokens; inside a block the masked product above is formed directly (a block x block
matrix), and everything before the block is carried by the recurrent state ``KV`` (D x Dv)::

    O_i   = [(Q_i K_i^T) * M] V_i  +  (Lambda Q_i) KV          Lambda = diag(lambda^1 .. lambda^B)
    KV   <- lambda^B KV + (lambda^B Lambda^{-1} K_i)^T V_i

so time and memory grow linearly in N. Non-causal lightning attention is ``Q (K^T V)`` (the
paper's decay is a causal construct, so it is not offered there).

On CUDA, causal calls that need no gradient run the fused Triton kernel of
``attnlab.kernels.triton_lightning`` (one launch, the state kept on chip); this PyTorch loop is the
reference, the CPU path and the autograd path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .softmax import check_heads, merge_heads, split_heads


def decay_slopes(n_heads: int) -> Tensor:
    """Per-head decay rates ``s_h`` (H,) float64, ``lambda_h = exp(-s_h)``: ALiBi's geometric slopes.

    ``s_h = 2 ** (-8 h / H)`` for h = 1..H, as in Lightning Attention-2's ``_build_slope_tensor``
    for a power-of-two H (other H use the same geometric rule, which is smooth in h).
    """
    h = torch.arange(1, n_heads + 1, dtype=torch.float64)
    return torch.pow(2.0, -8.0 * h / n_heads)


def _check(q: Tensor, k: Tensor, v: Tensor, causal: bool, decay: Tensor | None, block: int) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"`{name}` must be (B, H, N, D); got {name}.shape={tuple(t.shape)}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q, k, v must share (B, H), k and v N, q and k D; got {q.shape=}, {k.shape=}, {v.shape=}")
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"causal lightning attention is self-attention (Nq == Nk); got {q.shape[2]=}, {k.shape[2]=}")
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"`block` must be a positive int; got {block=}")
    if decay is not None:
        if not causal:
            raise ValueError(f"`decay` is defined for causal attention only; got causal=False with {decay=}")
        if decay.shape != (q.shape[1],) or bool((decay < 0).any()):
            raise ValueError(f"`decay` must be (H,) non-negative rates, H={q.shape[1]}; got {decay=}")


KERNELS = ("auto", "torch", "triton")


def _triton_reason(q: Tensor, k: Tensor, v: Tensor, strict: bool) -> str | None:
    """None when the fused Triton kernel can take this causal call, else why not.

    ``strict`` (kernel="triton") also admits CPU tensors under ``TRITON_INTERPRET=1``.
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return "gradients are needed and the Triton kernel is forward-only"
    if not strict and q.device.type != "cuda":
        return f"not on CUDA (device {q.device})"
    from ..kernels.triton_lightning import supports

    return supports(q, k, v)


def lightning_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    decay: Tensor | None = None,
    block: int = 64,
    kernel: str = "auto",
) -> Tensor:
    """Lightning attention ``[(Q K^T) * M] V`` (causal) or ``Q (K^T V)`` (non-causal), tiled.

    Args:
        q: (B, H, N, D) queries (already through the feature map).
        k: (B, H, N, D) keys; non-causal calls may have their own length M (cross attention).
        v: (B, H, N, Dv) values.
        causal: the language-model form (state carried forward block by block).
        decay: (H,) per-head rates ``s_h >= 0`` with ``lambda_h = exp(-s_h)``, or None (no decay,
            lambda = 1). Causal only.

    Other Parameters:
        block: tokens per tile of the PyTorch path (the paper's B; 64 in Lightning Attention-2). Any
            value gives the same result; it trades the block x block intra work against the number
            of state updates. The Triton kernel picks its own tiles (``default_config``).
        kernel: "auto" (the Triton kernel for causal calls on CUDA in float16/bfloat16/float32 with
            head dims <= 256 that need no gradient, else PyTorch), "torch" (always the PyTorch
            loop), "triton" (the kernel, or NotImplementedError saying why it cannot run).

    Returns:
        (B, H, N, Dv) in q's dtype.
    """
    _check(q, k, v, causal, decay, block)
    if kernel not in KERNELS:
        raise ValueError(f"`kernel` must be one of {KERNELS}; got {kernel=}")
    if not causal:
        # Two batched GEMMs already run near the device's matrix rate: no kernel of our own here.
        return q @ (k.transpose(-1, -2) @ v)  # (B, H, N, D) @ (B, H, D, Dv)
    if kernel != "torch":
        reason = _triton_reason(q, k, v, strict=kernel == "triton")
        if reason is None:
            from ..kernels.triton_lightning import lightning_forward

            return lightning_forward(q, k, v, decay)
        if kernel == "triton":
            raise NotImplementedError(f"kernel='triton' cannot run this call: {reason}")
    b, h, n, d = q.shape
    bs = min(block, n)
    pos = torch.arange(bs, device=q.device)
    if decay is None:
        intra_mask = torch.ones(bs, bs, device=q.device, dtype=q.dtype).tril()
        q_decay = k_decay = block_decay = None
    else:
        rates = decay.to(q.device, torch.float64).view(h, 1, 1)
        diff = (pos.view(-1, 1) - pos.view(1, -1)).to(torch.float64)  # t - s
        # Decay in float64, then the data's dtype: only lambda^k <= 1 is formed, so nothing overflows.
        intra_mask = torch.where(diff >= 0, torch.exp(-rates * diff.clamp(min=0)), 0.0).to(q.dtype)  # (H, bs, bs)
        q_decay = torch.exp(-rates * (pos + 1)).to(q.dtype).view(h, bs, 1)  # lambda^(t+1) for row t
        k_decay = torch.exp(-rates * (bs - 1 - pos)).to(q.dtype).view(h, bs, 1)  # lambda^(B-1-s)
        block_decay = torch.exp(-rates * bs).to(q.dtype)  # (H, 1, 1): lambda^B
    # One block at a time, as the paper's algorithm does: the working set stays a few (bs, D) tiles
    # and the (D, Dv) state, so time per token stays flat as N grows (the batched-over-blocks variant
    # was 2x slower at N = 16K on CPU, from its (nb, D, Dv) intermediates).
    state = q.new_zeros(b, h, d, v.shape[-1])  # KV: sum over earlier blocks of decayed K^T V
    outs = []
    for start in range(0, n, bs):
        qi, ki, vi = q[:, :, start : start + bs], k[:, :, start : start + bs], v[:, :, start : start + bs]
        m = qi.shape[2]  # the last block may be short: its first m rows and columns of the tiles apply
        scores = (qi @ ki.transpose(-1, -2)) * intra_mask[..., :m, :m]  # (B, H, m, m)
        if decay is None:
            outs.append(scores @ vi + qi @ state)
            state = state + ki.transpose(-1, -2) @ vi
            continue
        outs.append(scores @ vi + (qi * q_decay[:, :m]) @ state)
        # K's decay to the block end: a short block ends m tokens on, lambda^(m-1-s) = lambda^(B-1-s) / lambda^(B-m).
        k_to_end = k_decay[:, bs - m :] if m < bs else k_decay
        state = block_decay * state + (ki * k_to_end).transpose(-1, -2) @ vi
    return torch.cat(outs, dim=2)


def running_sum(x: Tensor, block: int = 64) -> Tensor:
    """``x.cumsum(2)`` for (B, H, N, D), tiled like lightning attention: a lower-triangular matmul
    inside each block plus the running total of the blocks before it.

    Why: on CPU ``cumsum`` along N (not the last dim) is a slow strided loop; this form was 2.4x
    faster at N = 16K, D = 64, and it shares the intra/inter split that makes lightning fast.
    """
    b, h, n, d = x.shape
    bs = min(block, n)
    pad = -n % bs
    xb = (F.pad(x, (0, 0, 0, pad)) if pad else x).view(b, h, (n + pad) // bs, bs, d)  # (B, H, nb, bs, D)
    inner = torch.ones(bs, bs, dtype=x.dtype, device=x.device).tril() @ xb  # sums within each block
    totals = inner[:, :, :, -1]  # (B, H, nb, D)
    before = F.pad(totals.cumsum(2)[:, :, :-1], (0, 0, 1, 0))  # exclusive: blocks before each block
    return (inner + before.unsqueeze(3)).view(b, h, n + pad, d)[:, :, :n]


class SimpleRMSNorm(nn.Module):
    """TransNormerLLM's SRMSNorm: ``x / rms(x)`` over the last dim, no learned scale."""

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class LightningAttention(nn.Module):
    """TransNormerLLM's gated linear attention layer run by lightning attention.

    ``Q = swish(x W_q)``, ``K = swish(x W_k)``, ``V = x W_v``, ``U = x W_u``;
    ``out = (SRMSNorm(lightning(Q, K, V)) * U) W_o``, the norm taken per head.
    Paper: "Various Lengths, Constant Speed: Efficient Language Modeling with Lightning Attention"
    (paper 46). Shapes: x (B, N, d_model) -> (B, N, d_model). Self-attention only (``context``
    raises): the paper defines no cross form.

    Args:
        causal: the language-model form.
        decay: per-head decay ``lambda_h = exp(-s_h)`` with ALiBi slopes (``decay_slopes``); None
            means on when causal. Non-causal attention has no decay.
        block: tile size (the paper's B = 64); the result does not depend on it.
    """

    def __init__(
        self, d_model: int, n_heads: int, *, causal: bool = False, decay: bool | None = None, block: int = 64
    ) -> None:
        super().__init__()
        check_heads(d_model, n_heads)
        decay = causal if decay is None else decay
        if decay and not causal:
            raise ValueError(f"`decay` needs causal=True (the decay mask is causal); got {decay=}, {causal=}")
        if not isinstance(block, int) or block < 1:
            raise ValueError(f"`block` must be a positive int; got {block=}")
        self.d_model, self.n_heads, self.causal, self.block = d_model, n_heads, causal, block
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.u_proj = nn.Linear(d_model, d_model, bias=False)  # the output gate U
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        self.norm = SimpleRMSNorm()
        self.register_buffer("decay", decay_slopes(n_heads).float() if decay else None, persistent=False)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if context is not None:
            raise ValueError("LightningAttention is self-attention only; got a `context` (cross attention)")
        q = split_heads(F.silu(self.q_proj(x)), self.n_heads)  # (B, H, N, D)
        k = split_heads(F.silu(self.k_proj(x)), self.n_heads)
        v = split_heads(self.v_proj(x), self.n_heads)
        o = lightning_attention(q, k, v, causal=self.causal, decay=self.decay, block=self.block)
        return self.o_proj(merge_heads(self.norm(o)) * self.u_proj(x))

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, causal={self.causal}, "
            f"decay={self.decay is not None}, block={self.block}"
        )


def main() -> None:
    """Toy run on CPU: the tiled result equals the O(N^2) form for a few block sizes."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 10, 4, dtype=torch.float64) for _ in range(3))
    s = decay_slopes(2)
    lam = torch.exp(-s).view(2, 1, 1)
    t = torch.arange(10)
    m = torch.where(t.view(-1, 1) >= t, lam ** (t.view(-1, 1) - t).clamp(min=0), 0.0)
    dense = ((q @ k.transpose(-1, -2)) * m) @ v
    for block in (1, 3, 4, 64):
        err = (lightning_attention(q, k, v, decay=s, block=block) - dense).abs().max().item()
        print(f"block={block}: max |tiled - dense| = {err:.2e}")
    print(LightningAttention(16, 4, causal=True))


if __name__ == "__main__":
    main()
