"""Triton source of the block-sparse attention kernel; the host side and the docs are in ``triton_block_sparse.py``.

Kept in its own module because Triton resolves the helpers a kernel calls from module globals, and
importing this module needs Triton, which attnlab does not require.
"""
import triton
import triton.language as tl

from .triton_online_softmax import accumulate, scores, softmax_finish, softmax_probs, softmax_step


@triton.jit
def _load_tile(src, kt, stride, offs_n, offs_w, n_kv, W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
               MASKED: tl.constexpr, USE_TMA: tl.constexpr):
    # (BLOCK_N, BLOCK_W) key or value tile kt: a TMA box (zeros past n_kv) or a row load.
    cols = kt * BLOCK_N + offs_n
    if USE_TMA:
        x = src.load([kt * BLOCK_N, 0])
    elif MASKED or BLOCK_W != W:
        x = tl.load(src + cols[:, None] * stride + offs_w[None, :], mask=(cols[:, None] < n_kv) & (offs_w[None, :] < W),
                    other=0.0)
    else:
        x = tl.load(src + cols[:, None] * stride + offs_w[None, :])
    return x


@triton.jit
def _visible(kt, q_pos, q_blk, lay, n_kv, causal_off, n_kb, bs, offs_n, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
             LAYOUT_MASK: tl.constexpr):
    # (BLOCK_M, BLOCK_N) element rule of a partial tile kt: key bound, causal edge, layout cell.
    cols = kt * BLOCK_N + offs_n
    ok = cols[None, :] < n_kv
    if CAUSAL:
        ok = ok & (cols[None, :] <= q_pos[:, None] + causal_off)
    if LAYOUT_MASK:
        k_blk = tl.minimum(cols // bs, n_kb - 1)
        ok = ok & (tl.load(lay + q_blk[:, None] * n_kb + k_blk[None, :]) != 0)
    return ok


@triton.jit
def block_sparse_fwd(
    Q, K, V, O,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    FULL_IDX, FULL_CNT, PART_IDX, PART_CNT, LAY,
    row_b, lay_b, lay_h, hdiv, n_qt, full_w, part_w, n_qb, n_kb, bs,
    qk_scale, H, GROUPS, n_q, n_kv, causal_off, n_batch,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, LAYOUT_MASK: tl.constexpr, EVEN_Q: tl.constexpr, IEEE: tl.constexpr,
    REVERSE: tl.constexpr, USE_TMA: tl.constexpr = False, PIPE: tl.constexpr = False,
    LATE_L: tl.constexpr = False, PART_STAGES: tl.constexpr = None, HINTS: tl.constexpr = False,
    PERSIST: tl.constexpr = False, FLATTEN: tl.constexpr = False, HALF_EXP: tl.constexpr = 0,
):
    # One program per (query tile, batch x head), or PERSIST: a fixed grid of programs walking the
    # items pid, pid + grid, ... in the same longest-first order (FLATTEN: one pipelined loop over all).
    if HINTS:
        # Facts the host guarantees; they let the compiler drop sign and overflow guards on addresses.
        tl.assume(sqn > 0)
        tl.assume(skn > 0)
        tl.assume(svn > 0)
        tl.assume(son > 0)
        tl.assume(H > 0)
        tl.assume(GROUPS > 0)
        tl.assume(hdiv > 0)
    if PERSIST:
        for w in tl.range(tl.program_id(0), n_qt * H * n_batch, tl.num_programs(0), flatten=FLATTEN):
            _program(w % n_qt, w // n_qt, Q, K, V, O,
                     sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                     FULL_IDX, FULL_CNT, PART_IDX, PART_CNT, LAY,
                     row_b, lay_b, lay_h, hdiv, n_qt, full_w, part_w, n_qb, n_kb, bs,
                     qk_scale, H, GROUPS, n_q, n_kv, causal_off,
                     BLOCK_M, BLOCK_N, D, DV, BLOCK_D, BLOCK_DV, CAUSAL, LAYOUT_MASK, EVEN_Q, IEEE,
                     REVERSE, USE_TMA, PIPE, LATE_L, PART_STAGES, HINTS, HALF_EXP)
    else:
        _program(tl.program_id(0), tl.program_id(1), Q, K, V, O,
                 sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                 FULL_IDX, FULL_CNT, PART_IDX, PART_CNT, LAY,
                 row_b, lay_b, lay_h, hdiv, n_qt, full_w, part_w, n_qb, n_kb, bs,
                 qk_scale, H, GROUPS, n_q, n_kv, causal_off,
                 BLOCK_M, BLOCK_N, D, DV, BLOCK_D, BLOCK_DV, CAUSAL, LAYOUT_MASK, EVEN_Q, IEEE,
                 REVERSE, USE_TMA, PIPE, LATE_L, PART_STAGES, HINTS, HALF_EXP)


@triton.jit
def _program(
    pid_m, pid_bh, Q, K, V, O,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    FULL_IDX, FULL_CNT, PART_IDX, PART_CNT, LAY,
    row_b, lay_b, lay_h, hdiv, n_qt, full_w, part_w, n_qb, n_kb, bs,
    qk_scale, H, GROUPS, n_q, n_kv, causal_off,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, LAYOUT_MASK: tl.constexpr, EVEN_Q: tl.constexpr, IEEE: tl.constexpr,
    REVERSE: tl.constexpr, USE_TMA: tl.constexpr, PIPE: tl.constexpr,
    LATE_L: tl.constexpr, PART_STAGES: tl.constexpr, HINTS: tl.constexpr, HALF_EXP: tl.constexpr,
):
    # One query tile of one (batch, head): its mask-free key tiles, then the ones needing the rule.
    if REVERSE:  # causal rows grow with the query index: start the longest programs first
        pid_m = n_qt - 1 - pid_m
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUPS
    hl = h // hdiv  # the layout's head (one per query head, per KV group, or shared)
    row = b * row_b + hl * n_qt + pid_m  # this program's row of the tile lists

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ptrs = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None].to(tl.int64) * sqn + offs_d[None, :]
    if EVEN_Q and BLOCK_D == D:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=(offs_m[:, None] < n_q) & (offs_d[None, :] < D), other=0.0)
    q_blk = tl.minimum(offs_m // bs, n_qb - 1)
    lay = LAY + b * lay_b + hl * lay_h

    k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    if USE_TMA:  # key/value tiles as TMA boxes; reads past n_kv come back as zeros
        k_src = tl.make_tensor_descriptor(k_base, [n_kv, D], [skn, 1], [BLOCK_N, BLOCK_D])
        v_src = tl.make_tensor_descriptor(v_base, [n_kv, DV], [svn, 1], [BLOCK_N, BLOCK_DV])
    else:
        k_src = k_base
        v_src = v_base
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    n_full = tl.load(FULL_CNT + row)
    full_row = FULL_IDX + row.to(tl.int64) * full_w
    if PIPE:
        # Scores of the next tile are issued before the softmax of this one, so the tensor cores can
        # work on q k^T while the softmax runs (FlashAttention-3's intra-warpgroup overlap, by hand).
        kt = tl.where(n_full > 0, tl.load(full_row), 0)
        s = scores(q, _load_tile(k_src, kt, skn, offs_n, offs_d, n_kv, D, BLOCK_N, BLOCK_D, True, USE_TMA), IEEE)
        for j in tl.range(1, n_full):
            kt_next = tl.load(full_row + j)
            s_next = scores(q, _load_tile(k_src, kt_next, skn, offs_n, offs_d, n_kv, D, BLOCK_N, BLOCK_D, False,
                                          USE_TMA), IEEE)
            v = _load_tile(v_src, kt, svn, offs_n, offs_dv, n_kv, DV, BLOCK_N, BLOCK_DV, False, USE_TMA)
            acc, m_i, l_i = softmax_step(acc, m_i, l_i, s, None, v, qk_scale, False, IEEE)
            s = s_next
            kt = kt_next
        if n_full > 0:
            v = _load_tile(v_src, kt, svn, offs_n, offs_dv, n_kv, DV, BLOCK_N, BLOCK_DV, False, USE_TMA)
            acc, m_i, l_i = softmax_step(acc, m_i, l_i, s, None, v, qk_scale, False, IEEE)
    else:
        if HINTS:
            tl.assume(n_full >= 0)
        for j in tl.range(0, n_full):
            kt = tl.load(full_row + j)
            k = _load_tile(k_src, kt, skn, offs_n, offs_d, n_kv, D, BLOCK_N, BLOCK_D, False, USE_TMA)
            p, alpha, m_i, l_new = softmax_probs(scores(q, k, IEEE), None, m_i, l_i, qk_scale, False, LATE_L, HALF_EXP)
            v = _load_tile(v_src, kt, svn, offs_n, offs_dv, n_kv, DV, BLOCK_N, BLOCK_DV, False, USE_TMA)
            acc = accumulate(acc, alpha, p, v, IEEE)
            if LATE_L:
                l_new = l_i * alpha + l_new
            l_i = l_new
    n_part = tl.load(PART_CNT + row)
    part_row = PART_IDX + row.to(tl.int64) * part_w
    if HINTS:
        tl.assume(n_part >= 0)
    # PART_STAGES: the masked loop is mostly one causal diagonal tile per row; pipelining it (the
    # kernel's stages) costs a second pipeline fill per program, so it may run better with 1.
    for j in tl.range(0, n_part, num_stages=PART_STAGES):
        kt = tl.load(part_row + j)
        k = _load_tile(k_src, kt, skn, offs_n, offs_d, n_kv, D, BLOCK_N, BLOCK_D, True, USE_TMA)
        s = scores(q, k, IEEE)
        ok = _visible(kt, offs_m, q_blk, lay, n_kv, causal_off, n_kb, bs, offs_n, BLOCK_N, CAUSAL, LAYOUT_MASK)
        p, alpha, m_i, l_new = softmax_probs(s, ok, m_i, l_i, qk_scale, True, LATE_L, HALF_EXP)
        v = _load_tile(v_src, kt, svn, offs_n, offs_dv, n_kv, DV, BLOCK_N, BLOCK_DV, True, USE_TMA)
        acc = accumulate(acc, alpha, p, v, IEEE)
        if LATE_L:
            l_new = l_i * alpha + l_new
        l_i = l_new

    out = softmax_finish(acc, l_i)
    o_ptrs = O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_m[:, None].to(tl.int64) * son + offs_dv[None, :]
    if EVEN_Q and BLOCK_DV == DV:
        tl.store(o_ptrs, out.to(O.dtype.element_ty))
    else:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < n_q) & (offs_dv[None, :] < DV))
