"""Triton source of the local-attention kernel; the host side and the docs are in ``triton_local.py``.

Kept in its own module because Triton resolves the helpers a kernel calls from module globals, and
importing this module needs Triton, which attnlab does not require.
"""
import triton
import triton.language as tl

from .triton_online_softmax import accumulate, scores, softmax_finish, softmax_probs

@triton.jit
def _tile_tokens(t, n_t1, n_t2, c0, c1, c2, T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, L0, L1, L2):
    # Flat tile id -> grid coordinates of its tokens (c* are in-tile offsets) and row-major ids.
    t2 = t % n_t2
    t1 = (t // n_t2) % n_t1
    t0 = t // (n_t2 * n_t1)
    x0 = t0 * T0 + c0
    x1 = t1 * T1 + c1
    x2 = t2 * T2 + c2
    ok = (x0 < L0) & (x1 < L1) & (x2 < L2)
    return x0, x1, x2, (x0 * L1 + x1) * L2 + x2, ok

@triton.jit
def _load_tile(desc, base, rows, stride, offs, ok, t0, t1, t2, T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr,
               NDIM: tl.constexpr, BLOCK: tl.constexpr, WIDTH: tl.constexpr, BLOCK_W: tl.constexpr,
               EVEN: tl.constexpr, USE_TMA: tl.constexpr):
    # One (BLOCK, BLOCK_W) key or value tile: a box of the grid through TMA, or a row gather.
    if USE_TMA:
        if NDIM == 1:
            x = desc.load([t0 * T0, 0])
        elif NDIM == 2:
            x = desc.load([t0 * T0, t1 * T1, 0]).reshape(BLOCK, BLOCK_W)
        else:
            x = desc.load([t0 * T0, t1 * T1, t2 * T2, 0]).reshape(BLOCK, BLOCK_W)
    elif EVEN and BLOCK_W == WIDTH:
        x = tl.load(base + rows[:, None] * stride + offs[None, :])
    else:
        x = tl.load(base + rows[:, None] * stride + offs[None, :], mask=ok[:, None] & (offs[None, :] < WIDTH), other=0.0)
    return x


@triton.jit
def _attend(acc, m_i, l_i, q, K_base, V_base, k_desc, v_desc, skn, svn, t0, t1, t2, k_rel, offs_d, offs_dv,
            kc0, kc1, kc2, lo0, hi0, lo1, hi1, lo2, hi2, qk_scale,
            n_k1, n_k2, KT0: tl.constexpr, KT1: tl.constexpr, KT2: tl.constexpr, KL0, KL1, KL2,
            NDIM: tl.constexpr, MASKED: tl.constexpr, EVEN_K: tl.constexpr,
            D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
            IEEE: tl.constexpr, USE_TMA: tl.constexpr, LATE_L: tl.constexpr, HALF_EXP: tl.constexpr):
    BLOCK_N: tl.constexpr = KT0 * KT1 * KT2
    # Key tile origin: tile-relative row offsets k_rel are the same for every tile of the grid.
    origin = ((t0 * KT0) * KL1 + t1 * KT1) * KL2 + t2 * KT2
    rows = origin + k_rel
    y0 = t0 * KT0 + kc0
    y1 = t1 * KT1 + kc1
    y2 = t2 * KT2 + kc2
    k_ok = (y0 < KL0) & (y1 < KL1) & (y2 < KL2)
    k = _load_tile(k_desc, K_base, rows, skn, offs_d, k_ok, t0, t1, t2, KT0, KT1, KT2,
                   NDIM, BLOCK_N, D, BLOCK_D, EVEN_K, USE_TMA)
    s = scores(q, k, IEEE)
    ok = None  # interior tile: every key lies in every row's window
    if MASKED:
        ok = (y0[None, :] >= lo0[:, None]) & (y0[None, :] < hi0[:, None])
        if NDIM >= 2:
            ok = ok & (y1[None, :] >= lo1[:, None]) & (y1[None, :] < hi1[:, None])
        if NDIM >= 3:
            ok = ok & (y2[None, :] >= lo2[:, None]) & (y2[None, :] < hi2[:, None])
        if not EVEN_K:
            ok = ok & k_ok[None, :]
    p, alpha, m_i, l_new = softmax_probs(s, ok, m_i, l_i, qk_scale, MASKED, LATE_L, HALF_EXP)
    v = _load_tile(v_desc, V_base, rows, svn, offs_dv, k_ok, t0, t1, t2, KT0, KT1, KT2,
                   NDIM, BLOCK_N, DV, BLOCK_DV, EVEN_K, USE_TMA)
    acc = accumulate(acc, alpha, p, v, IEEE)
    if LATE_L:
        l_new = l_i * alpha + l_new
    return acc, m_i, l_new


@triton.jit
def _listed_tile(IDX, pid_m, width, j, n_k1, n_k2):
    # Grid coordinates (t0, t1, t2) of the j-th key tile in this program's row of a packed tile list.
    kt = tl.load(IDX + pid_m * width + j)
    t2 = kt % n_k2
    t1 = (kt // n_k2) % n_k1
    t0 = kt // (n_k2 * n_k1)
    return t0, t1, t2

@triton.jit
def local_fwd(
    Q, K, V, O,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    LO0, HI0, LO1, HI1, LO2, HI2,
    FULL_IDX, FULL_CNT, PART_IDX, PART_CNT, max_full, max_part, FBOX,
    INIT_IDX, OI, LI, soc, sobh, sor, slc, slbh, slr, ORDER,
    qk_scale, H, GROUPS,
    QL0, QL1, QL2, KL0, KL1, KL2, n_q1, n_q2, n_k1, n_k2, n_qt, n_work,
    NDIM: tl.constexpr,
    QT0: tl.constexpr, QT1: tl.constexpr, QT2: tl.constexpr,
    KT0: tl.constexpr, KT1: tl.constexpr, KT2: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_Q: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
    USE_TMA: tl.constexpr = False, WS: tl.constexpr = False, FULL_BOX: tl.constexpr = False,
    LATE_L: tl.constexpr = False, PART_STAGES: tl.constexpr = None, HINTS: tl.constexpr = False,
    PERSIST: tl.constexpr = False, FLATTEN: tl.constexpr = False, HALF_EXP: tl.constexpr = 0,
    SKIP_PART: tl.constexpr = False, INIT: tl.constexpr = False, HAS_ORDER: tl.constexpr = False,
):
    # One program per (query tile, batch x head), or PERSIST: a fixed grid of programs, each walking
    # work items pid, pid + grid, ... (FLATTEN lets Triton pipeline across them: the next item's loads
    # are issued during this item's last tiles and its store).
    if HINTS:
        # Facts the host guarantees; they let the compiler drop sign and overflow guards on addresses.
        tl.assume(sqn > 0)
        tl.assume(skn > 0)
        tl.assume(svn > 0)
        tl.assume(son > 0)
        tl.assume(H > 0)
        tl.assume(GROUPS > 0)
    if PERSIST:
        for w in tl.range(tl.program_id(0), n_work, tl.num_programs(0), flatten=FLATTEN):
            t = w % n_qt
            if HAS_ORDER:  # query tiles in the host's order (the longest first: no long tile in the last wave)
                t = tl.load(ORDER + t)
            _program(t, w // n_qt, Q, K, V, O,
                     sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                     LO0, HI0, LO1, HI1, LO2, HI2,
                     FULL_IDX, FULL_CNT, PART_IDX, PART_CNT, max_full, max_part, FBOX,
                     INIT_IDX, OI, LI, soc, sobh, sor, slc, slbh, slr,
                     qk_scale, H, GROUPS, QL0, QL1, QL2, KL0, KL1, KL2, n_q1, n_q2, n_k1, n_k2,
                     NDIM, QT0, QT1, QT2, KT0, KT1, KT2, D, DV, BLOCK_D, BLOCK_DV, EVEN_Q, EVEN_K, IEEE,
                     USE_TMA, WS, FULL_BOX, LATE_L, PART_STAGES, HINTS, HALF_EXP, SKIP_PART, INIT)
    else:
        t = tl.program_id(0)
        if HAS_ORDER:
            t = tl.load(ORDER + t)
        _program(t, tl.program_id(1), Q, K, V, O,
                 sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                 LO0, HI0, LO1, HI1, LO2, HI2,
                 FULL_IDX, FULL_CNT, PART_IDX, PART_CNT, max_full, max_part, FBOX,
                 INIT_IDX, OI, LI, soc, sobh, sor, slc, slbh, slr,
                 qk_scale, H, GROUPS, QL0, QL1, QL2, KL0, KL1, KL2, n_q1, n_q2, n_k1, n_k2,
                 NDIM, QT0, QT1, QT2, KT0, KT1, KT2, D, DV, BLOCK_D, BLOCK_DV, EVEN_Q, EVEN_K, IEEE,
                 USE_TMA, WS, FULL_BOX, LATE_L, PART_STAGES, HINTS, HALF_EXP, SKIP_PART, INIT)


@triton.jit
def _program(
    pid_m, pid_bh, Q, K, V, O,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    LO0, HI0, LO1, HI1, LO2, HI2,
    FULL_IDX, FULL_CNT, PART_IDX, PART_CNT, max_full, max_part, FBOX,
    INIT_IDX, OI, LI, soc, sobh, sor, slc, slbh, slr,
    qk_scale, H, GROUPS,
    QL0, QL1, QL2, KL0, KL1, KL2, n_q1, n_q2, n_k1, n_k2,
    NDIM: tl.constexpr,
    QT0: tl.constexpr, QT1: tl.constexpr, QT2: tl.constexpr,
    KT0: tl.constexpr, KT1: tl.constexpr, KT2: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_Q: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
    USE_TMA: tl.constexpr, WS: tl.constexpr, FULL_BOX: tl.constexpr,
    LATE_L: tl.constexpr, PART_STAGES: tl.constexpr, HINTS: tl.constexpr, HALF_EXP: tl.constexpr,
    SKIP_PART: tl.constexpr, INIT: tl.constexpr,
):
    # One query tile of one (batch, head): the full tiles mask-free, then the partial ones masked.
    BLOCK_M: tl.constexpr = QT0 * QT1 * QT2
    BLOCK_N: tl.constexpr = KT0 * KT1 * KT2
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUPS

    offs_m = tl.arange(0, BLOCK_M)
    x0, x1, x2, q_rows, q_ok = _tile_tokens(
        pid_m, n_q1, n_q2, offs_m // (QT1 * QT2), (offs_m // QT2) % QT1, offs_m % QT2,
        QT0, QT1, QT2, QL0, QL1, QL2)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ptrs = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + q_rows[:, None].to(tl.int64) * sqn + offs_d[None, :]
    if EVEN_Q and BLOCK_D == D:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=q_ok[:, None] & (offs_d[None, :] < D), other=0.0)

    # Window bounds of every query row, per axis (clamped index: padded rows are never stored).
    lo0 = tl.load(LO0 + tl.minimum(x0, QL0 - 1))
    hi0 = tl.load(HI0 + tl.minimum(x0, QL0 - 1))
    lo1 = tl.load(LO1 + tl.minimum(x1, QL1 - 1))
    hi1 = tl.load(HI1 + tl.minimum(x1, QL1 - 1))
    lo2 = tl.load(LO2 + tl.minimum(x2, QL2 - 1))
    hi2 = tl.load(HI2 + tl.minimum(x2, QL2 - 1))

    offs_n = tl.arange(0, BLOCK_N)
    kc0 = offs_n // (KT1 * KT2)
    kc1 = (offs_n // KT2) % KT1
    kc2 = offs_n % KT2
    k_rel = (kc0 * KL1 + kc1) * KL2 + kc2
    K_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    V_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh

    if USE_TMA:
        # Key/value tiles are boxes of the (grid..., D) view of this head: one TMA copy each.
        if NDIM == 1:
            k_desc = tl.make_tensor_descriptor(K_base, [KL0, D], [skn, 1], [KT0, BLOCK_D])
            v_desc = tl.make_tensor_descriptor(V_base, [KL0, DV], [svn, 1], [KT0, BLOCK_DV])
        elif NDIM == 2:
            k_desc = tl.make_tensor_descriptor(K_base, [KL0, KL1, D], [KL1 * skn, skn, 1], [KT0, KT1, BLOCK_D])
            v_desc = tl.make_tensor_descriptor(V_base, [KL0, KL1, DV], [KL1 * svn, svn, 1], [KT0, KT1, BLOCK_DV])
        else:
            k_desc = tl.make_tensor_descriptor(K_base, [KL0, KL1, KL2, D], [KL1 * KL2 * skn, KL2 * skn, skn, 1],
                                               [KT0, KT1, KT2, BLOCK_D])
            v_desc = tl.make_tensor_descriptor(V_base, [KL0, KL1, KL2, DV], [KL1 * KL2 * svn, KL2 * svn, svn, 1],
                                               [KT0, KT1, KT2, BLOCK_DV])
    else:
        k_desc = K_base
        v_desc = V_base
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    if INIT:
        # A dense kernel already attended this tile's mask-free keys (dense_core.py): start from its
        # normalised output and natural log-sum-exp as the state m = lse (log2 units), l = 1, acc = out.
        # INIT_IDX[tile] = (group in that output, first row in the group), group -1 for tiles it did not cover.
        c = tl.load(INIT_IDX + pid_m * 2)
        r0 = tl.load(INIT_IDX + pid_m * 2 + 1)
        has = c >= 0
        cc = tl.maximum(c, 0).to(tl.int64)
        rows0 = r0 + offs_m
        o0 = tl.load(OI + cc * soc + pid_bh.to(tl.int64) * sobh + rows0[:, None] * sor + offs_dv[None, :],
                     mask=has & (offs_dv[None, :] < DV), other=0.0)
        # (offs_m >= 0 is always true: it turns the scalar `has` into a (BLOCK_M,) row mask)
        lse = tl.load(LI + cc * slc + pid_bh.to(tl.int64) * slbh + rows0 * slr, mask=has & (offs_m >= 0),
                      other=float("-inf"))
        m_i = lse * 1.4426950408889634
        l_i = tl.where(has & (offs_m >= 0), 1.0, 0.0)
        acc = o0.to(tl.float32)

    if FULL_BOX:
        # Mask-free tiles form a box of key tiles: enumerate it from its corner and extent.
        f0 = tl.load(FBOX + pid_m * 6 + 0)
        f1 = tl.load(FBOX + pid_m * 6 + 1)
        f2 = tl.load(FBOX + pid_m * 6 + 2)
        e1 = tl.load(FBOX + pid_m * 6 + 4)
        e2 = tl.load(FBOX + pid_m * 6 + 5)
        n_full = tl.load(FBOX + pid_m * 6 + 3) * e1 * e2
    else:
        n_full = tl.load(FULL_CNT + pid_m)
    if HINTS:
        tl.assume(n_full >= 0)
    for j in tl.range(0, n_full, warp_specialize=WS):
        if FULL_BOX:
            t2 = f2 + j % e2
            t1 = f1 + (j // e2) % e1
            t0 = f0 + j // (e2 * e1)
        else:
            t0, t1, t2 = _listed_tile(FULL_IDX, pid_m, max_full, j, n_k1, n_k2)
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, K_base, V_base, k_desc, v_desc, skn, svn, t0, t1, t2, k_rel, offs_d, offs_dv,
                                kc0, kc1, kc2, lo0, hi0, lo1, hi1, lo2, hi2, qk_scale,
                                n_k1, n_k2, KT0, KT1, KT2, KL0, KL1, KL2,
                                NDIM, False, True, D, DV, BLOCK_D, BLOCK_DV, IEEE, USE_TMA, LATE_L, HALF_EXP)
    # SKIP_PART: the host knows the plan has no masked tile (tile-aligned patterns): no second loop at all.
    if not SKIP_PART:
        n_part = tl.load(PART_CNT + pid_m)
        if HINTS:
            tl.assume(n_part >= 0)
        # PART_STAGES: a loop of one or two masked tiles may run better unpipelined (1) than with the
        # kernel's stages, whose prologue is a second pipeline fill per program.
        for j in tl.range(0, n_part, num_stages=PART_STAGES, warp_specialize=WS):
            t0, t1, t2 = _listed_tile(PART_IDX, pid_m, max_part, j, n_k1, n_k2)
            acc, m_i, l_i = _attend(acc, m_i, l_i, q, K_base, V_base, k_desc, v_desc, skn, svn, t0, t1, t2, k_rel,
                                    offs_d, offs_dv, kc0, kc1, kc2, lo0, hi0, lo1, hi1, lo2, hi2, qk_scale,
                                    n_k1, n_k2, KT0, KT1, KT2, KL0, KL1, KL2,
                                    NDIM, True, EVEN_K, D, DV, BLOCK_D, BLOCK_DV, IEEE, USE_TMA, LATE_L, HALF_EXP)

    out = softmax_finish(acc, l_i)
    o_ptrs = O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + q_rows[:, None].to(tl.int64) * son + offs_dv[None, :]
    if EVEN_Q and BLOCK_DV == DV:
        tl.store(o_ptrs, out.to(O.dtype.element_ty))
    else:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=q_ok[:, None] & (offs_dv[None, :] < DV))
