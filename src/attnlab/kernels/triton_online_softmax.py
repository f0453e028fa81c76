"""Triton source of the flash-attention inner step shared by the local and block-sparse kernels.

One key/value tile of the online softmax ("FlashAttention: Fast and Memory-Efficient Exact Attention
with IO-Awareness", Dao et al., 2022): scores, running row max and sum, rescale of the accumulator,
then ``acc += p v``. Scores are in log2 units (``qk_scale`` has log2(e) folded in) so ``exp2`` is one
instruction. Each kernel builds its own element mask (window bounds, causal edge, layout cell) and
passes it in; tiles known to be all-visible skip it. A step is ``scores``,
``softmax_probs`` then ``accumulate`` (``softmax_step`` when the value tile is already loaded);
``softmax_finish`` divides by the row sums at the end. Every kernel state is float32: acc
(BLOCK_M, BLOCK_DV), m_i and l_i (BLOCK_M,), starting at 0, -inf and 0.

Kept in its own module because importing it needs Triton, which attnlab does not require; the
kernel modules import it, and Triton resolves the helpers a kernel calls from their module globals.
"""
import triton
import triton.language as tl


@triton.jit
def scores(q, k, IEEE: tl.constexpr):
    """q (BLOCK_M, D) @ k (BLOCK_N, D)^T -> (BLOCK_M, BLOCK_N) float32; IEEE: float32 products, not TF32."""
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    return s


@triton.jit
def _exp2(x, HALF_EXP: tl.constexpr):
    """2**x of a float32 tile: float32 (HALF_EXP=0), or in 16 bits, two lanes per instruction, for the
    p @ v product that rounds p to 16 bits anyway: 1 = ex2.approx.ftz.bf16x2 (sm_90), 2 = ex2.approx.f16x2,
    3 = float32 exp2 rounded to bfloat16 (what the interpreter can run, to test the 16-bit data path)."""
    if HALF_EXP == 1:
        y = tl.inline_asm_elementwise("ex2.approx.ftz.bf16x2 $0, $1;", "=r,r", [x.to(tl.bfloat16)],
                                      dtype=tl.bfloat16, is_pure=True, pack=2)
    elif HALF_EXP == 2:
        y = tl.inline_asm_elementwise("ex2.approx.f16x2 $0, $1;", "=r,r", [x.to(tl.float16)],
                                      dtype=tl.float16, is_pure=True, pack=2)
    elif HALF_EXP == 3:
        y = tl.math.exp2(x.to(tl.bfloat16).to(tl.float32)).to(tl.bfloat16)
    else:
        y = tl.math.exp2(x)
    return y


@triton.jit
def softmax_probs(s, ok, m_i, l_i, qk_scale, MASKED: tl.constexpr, LATE_L: tl.constexpr = False,
                  HALF_EXP: tl.constexpr = 0):
    """Online-softmax update of one score tile; returns (p, alpha, m_i, l_i) for ``accumulate``.

    s (BLOCK_M, BLOCK_N) unscaled scores; m_i / l_i (BLOCK_M,) float32 running row max (log2 units)
    and sum. MASKED: ok (BLOCK_M, BLOCK_N) bool says which scores count; otherwise ok is ignored
    (pass None) and every score counts. p (BLOCK_M, BLOCK_N) float32 unnormalised probabilities,
    alpha (BLOCK_M,) the factor that rescales the accumulator to the new max.
    LATE_L: return this tile's row sums (BLOCK_M,) instead of the updated l_i; the caller folds them in
    with ``l_i * alpha + l_ij`` after ``accumulate`` (the order of Triton's fused-attention tutorial,
    which keeps l_i out of the registers live across the p @ v product).
    HALF_EXP: p in 16 bits from a 16-bit exp2 (see ``_exp2``): half the MUFU issue slots per score;
    l then sums the same rounded p that the product uses.
    """
    if MASKED:
        s = tl.where(ok, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing allowed so far keeps m = -inf; subtract 0 instead to avoid inf - inf.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = _exp2(s - m_use[:, None], HALF_EXP)
    else:
        # Mask-free tile: the scale folds into one multiply-add per score.
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        m_use = m_new
        p = _exp2(s * qk_scale - m_use[:, None], HALF_EXP)
    alpha = tl.math.exp2(m_i - m_use)
    if LATE_L:
        l_i = tl.sum(p.to(tl.float32), 1)
    else:
        l_i = l_i * alpha + tl.sum(p.to(tl.float32), 1)
    return p, alpha, m_new, l_i


@triton.jit
def accumulate(acc, alpha, p, v, IEEE: tl.constexpr):
    """acc (BLOCK_M, BLOCK_DV) float32 rescaled by alpha, plus p (BLOCK_M, BLOCK_N) @ v (BLOCK_N, BLOCK_DV).

    Separate from ``softmax_probs`` so a kernel can issue the value tile's load between the two: the
    local kernel's 1-D TMA variant then builds with 178 registers per thread, 222 when the tile is
    loaded before the softmax (sm_90, Triton 3.6, cuobjdump).
    """
    acc = acc * alpha[:, None]
    if IEEE:
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc


@triton.jit
def softmax_step(acc, m_i, l_i, s, ok, v, qk_scale, MASKED: tl.constexpr, IEEE: tl.constexpr):
    """``softmax_probs`` then ``accumulate`` for a value tile v already loaded; returns (acc, m_i, l_i)."""
    p, alpha, m_i, l_i = softmax_probs(s, ok, m_i, l_i, qk_scale, MASKED)
    acc = accumulate(acc, alpha, p, v, IEEE)
    return acc, m_i, l_i


@triton.jit
def softmax_finish(acc, l_i):
    """Normalised output (BLOCK_M, BLOCK_DV) float32 of the final state."""
    # Rows that saw no key have l = 0 and acc = 0: divide by 1 so they come out as zeros, not NaN.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    return acc / l_safe[:, None]
