"""Gluon source of the ping-pong local-attention kernel for Hopper GPUs; the host side is ``gluon_local.py``.

FlashAttention-3's schedule ("FlashAttention-3: Fast and Accurate Attention with Asynchrony and
Low-precision", Shah et al., 2024), written here from its description in Gluon, Triton's lower-level
dialect: a producer warp copies query tiles and key/value tiles into shared-memory slots with TMA, and two
consumer warpgroups, each with half of the query tile, take turns on the tensor cores: while one runs its
softmax, the other's p @ v and next q k^T run. Turns and slots are mbarriers. The grid is persistent:
each program walks several (query tile, head) items, so one item's loads overlap the previous one's
last tiles and store. Short items (HaloNet's 8 key tiles, 2 for 16x16 blocks) pay for what happens
once per item, so the next item's query tile is loaded while the current item runs, and each warpgroup
writes its output through its own staging slot with a TMA store that it waits for only an item later
(H200, HaloNet: 0.65 -> 0.72 of the ideal; benchmarks/results/h200_gluon_s8.md, h200_gluon_s9.md).

Key tiles are boxes of the token grid (1-D runs or 2-D boxes), enumerated per query tile from the corner
and extent of the box that holds its rows' windows (at any token, not only at tile multiples). Each tile
(and each warpgroup's half of a query tile) is one TMA box of a rank-3 view (grid rows, grid columns,
head dim): on an H200 that ran the 2-D cases 2-5% faster than 8-16 copies of contiguous runs
(h200_gluon_s9.md). Partial
tiles get each row's window as a mask (MASKED), tiles inside every row's window none; the host's
per-warpgroup window extremes decide which, and a warpgroup whose rows share one window masks with one
vector over the keys. Kept in its own
module because Gluon resolves helpers from module globals and importing it needs Triton with Gluon
(3.5+), which attnlab does not require.
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)


@gluon.jit
def _item(w, n_qt, n_qt1, KBOX):
    # Work item w = (batch x head, query tile): the tile's grid position and its box of keys (first key
    # row and column in tokens, extent in key tiles).
    t = w % n_qt
    kr0 = gl.load(KBOX + t * 4)
    kc0 = gl.load(KBOX + t * 4 + 1)
    ke1 = gl.load(KBOX + t * 4 + 3)
    return w // n_qt, t // n_qt1, t % n_qt1, kr0, kc0, ke1, gl.load(KBOX + t * 4 + 2) * ke1


@gluon.jit
def _next_tile(ty, tx, kc0, ke1, KT0: gl.constexpr, K_WIDTH: gl.constexpr):
    # The grid row and column of the box's next key tile (row-major over the box, ke1 tiles per row):
    # carried from tile to tile, since a division by ke1 per tile costs ~40 instructions.
    tx += K_WIDTH
    if tx >= kc0 + ke1 * K_WIDTH:
        tx = kc0
        ty += KT0
    return ty, tx


@gluon.jit
def _load_q(q_desc, q_ready, q_empty, q_bufs, w, i, QY, n_qt, n_qt1, KBOX, QT0: gl.constexpr, Q_WIDTH: gl.constexpr,
            QH0: gl.constexpr, QH1: gl.constexpr):
    # The query tile of item w (this program's i-th) into query slot i % 2, once both warpgroups freed it:
    # one box of QH0 x QH1 tokens per warpgroup half.
    bh, qa, qb, kr0, kc0, ke1, n_tiles = _item(w, n_qt, n_qt1, KBOX)
    qs = i % 2
    mbarrier.wait(q_empty.index(qs), ((i // 2) & 1) ^ 1)
    mbarrier.expect(q_ready.index(qs), 2 * q_desc.block_type.nbytes)
    for h in gl.static_range(2):  # half h starts QT0 // 2 grid rows down (2-D tiles) or QH1 tokens on (1-D)
        row = bh * QY + qa * QT0 + h * (QT0 // 2)
        col = qb * Q_WIDTH + h * (Q_WIDTH - QH1)
        tma.async_copy_global_to_shared(q_desc, [row, col, 0], q_ready.index(qs),
                                        q_bufs.index(2 * qs + h).reshape(q_desc.block_type.shape))


@gluon.jit
def _loader(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_ready, q_empty, k_ready, v_ready, k_empty, v_empty,
            KBOX, QY, KY, H, GROUPS, n_qt, n_qt1, n_work, QT0: gl.constexpr, Q_WIDTH: gl.constexpr,
            QH0: gl.constexpr, QH1: gl.constexpr, KT0: gl.constexpr, K_WIDTH: gl.constexpr, NUM_BUF: gl.constexpr,
            Q_EARLY: gl.constexpr):
    # Producer warp: the key/value tiles of this program's work items into the ring (running counters:
    # slots and phases carry across items), each one TMA box of KT0 x K_WIDTH tokens of the key grid, and
    # their query tiles into two query slots, the next item's once both warpgroups have freed its slot.
    # Q_EARLY (slots freed as soon as an item's last scores are done): after the current item's last
    # key/value tile; otherwise (slots freed at the next item's first scores) after its first one.
    it = 0
    i = 0
    _load_q(q_desc, q_ready, q_empty, q_bufs, gl.program_id(0), 0, QY, n_qt, n_qt1, KBOX, QT0, Q_WIDTH, QH0, QH1)
    for w in range(gl.program_id(0), n_work, gl.num_programs(0)):
        bh, qa, qb, kr0, kc0, ke1, n_tiles = _item(w, n_qt, n_qt1, KBOX)
        row0 = ((bh // H) * (H // GROUPS) + (bh % H) // GROUPS) * KY  # this head's key grid, rows stacked
        ty = kr0
        tx = kc0
        for j in range(n_tiles):
            s = (it + j) % NUM_BUF
            ph = ((it + j) // NUM_BUF) & 1
            mbarrier.wait(k_empty.index(s), ph ^ 1)  # a fresh barrier counts as freed: the first pass goes through
            mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [row0 + ty, tx, 0], k_ready.index(s),
                                            k_bufs.index(s).reshape(k_desc.block_type.shape))
            mbarrier.wait(v_empty.index(s), ph ^ 1)
            mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v_desc, [row0 + ty, tx, 0], v_ready.index(s),
                                            v_bufs.index(s).reshape(v_desc.block_type.shape))
            q_at = 0
            if Q_EARLY:
                q_at = n_tiles - 1
            if j == q_at:
                if w + gl.num_programs(0) < n_work:
                    _load_q(q_desc, q_ready, q_empty, q_bufs, w + gl.num_programs(0), i + 1, QY, n_qt, n_qt1, KBOX,
                            QT0, Q_WIDTH, QH0, QH1)
            ty, tx = _next_tile(ty, tx, kc0, ke1, KT0, K_WIDTH)
        it += n_tiles
        i += 1


@gluon.jit
def _mask(y0, x0, s, win, s_layout: gl.constexpr, KT0: gl.constexpr, K_WIDTH: gl.constexpr):
    # Scores of the key tile whose first key is at grid row y0, column x0 outside each row's window -> -inf;
    # a tile inside every row's window is left alone (the extremes of the warpgroup's rows decide, once
    # per tile). When all the warpgroup's rows share one window (HaloNet blocks, the rows of a 2-D
    # neighborhood's stride), the mask is one vector over the tile's keys.
    lo0, hi0, lo1, hi1, lo0_max, hi0_min, lo1_max, hi1_min, uniform = win
    if (y0 < lo0_max) | (y0 + KT0 > hi0_min) | (x0 < lo1_max) | (x0 + K_WIDTH > hi1_min):
        c = gl.arange(0, KT0 * K_WIDTH, layout=gl.SliceLayout(0, s_layout))
        y = y0 + c // K_WIDTH
        x = x0 + c % K_WIDTH
        if uniform:
            in_key = (y >= lo0_max) & (y < hi0_min) & (x >= lo1_max) & (x < hi1_min)
            s = gl.where(in_key[None, :], s, float("-inf"))
        else:
            ok = ((y[None, :] >= lo0[:, None]) & (y[None, :] < hi0[:, None]) & (x[None, :] >= lo1[:, None])
                  & (x[None, :] < hi1[:, None]))
            s = gl.where(ok, s, float("-inf"))
    return s


@gluon.jit
def _step(j, it, tc, y0, x0, s, acc, m_i, l_i, s_zero, q_smem, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty,
          turn, qk_scale, win, s_layout: gl.constexpr, o_layout: gl.constexpr, HALF: gl.constexpr,
          NUM_BUF: gl.constexpr, ISSUE_NEXT: gl.constexpr, MASKED: gl.constexpr, KT0: gl.constexpr,
          K_WIDTH: gl.constexpr):
    # Key tile j of the item (ring position it + j, turn tc + j + 1) for one warpgroup: its softmax alone,
    # then p @ v and the next tile's scores as one burst in this warpgroup's turn, so the other
    # warpgroup's burst runs on the tensor cores during this softmax.
    if MASKED:
        s = _mask(y0, x0, s, win, s_layout, KT0, K_WIDTH)
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    m_use = m_new
    if MASKED:  # a row with no key yet keeps m = -inf: subtract 0 instead, so exp2 gives 0, not NaN
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    p = gl.exp2(s * qk_scale - m_use[:, None])
    alpha = gl.exp2(m_i - m_use)
    l_i = l_i * alpha + gl.sum(p, 1)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    p16 = gl.convert_layout(p.to(q_smem.dtype), gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2))
    slot = (it + j) % NUM_BUF
    mbarrier.wait(v_ready.index(slot), ((it + j) // NUM_BUF) & 1)
    mbarrier.wait(turn.index(HALF), ((tc + j + 1) & 1) ^ (1 - HALF))
    acc_t = warpgroup_mma(p16, v_bufs.index(slot), acc, is_async=True)
    if ISSUE_NEXT:
        nxt = (it + j + 1) % NUM_BUF
        mbarrier.wait(k_ready.index(nxt), ((it + j + 1) // NUM_BUF) & 1)
        s_t = warpgroup_mma(q_smem, k_bufs.index(nxt).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        mbarrier.arrive(turn.index(1 - HALF), count=1)
        s, acc = warpgroup_mma_wait(num_outstanding=0, deps=(s_t, acc_t))
        mbarrier.arrive(k_empty.index(nxt), count=1)
    else:
        mbarrier.arrive(turn.index(1 - HALF), count=1)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc_t, ))
    mbarrier.arrive(v_empty.index(slot), count=1)
    return s, acc, m_new, l_i


@gluon.jit
def _consumer(HALF: gl.constexpr, q_bufs, o_bufs, k_bufs, v_bufs, q_ready, q_empty, k_ready, v_ready, k_empty, v_empty,
              turn, o_desc, KBOX, EXT, LO0, HI0, LO1, HI1, QY, n_qt, n_qt1, n_work, qk_scale,
              HALF_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, Q_WIDTH: gl.constexpr,
              K_WIDTH: gl.constexpr, NUM_BUF: gl.constexpr, MASKED: gl.constexpr, QH1: gl.constexpr,
              Q_EARLY: gl.constexpr):
    # One consumer warpgroup: for each work item of this program, rows HALF * HALF_M ... of its query tile
    # against every key tile, then those rows of the output (tile row m is grid row m // Q_WIDTH, column
    # m % Q_WIDTH of the tile), through this warpgroup's staging slot by TMA. Ring positions (it) and
    # turns (tc) run on across items.
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_D, 16])
    KT0: gl.constexpr = BLOCK_N // K_WIDTH
    QT0: gl.constexpr = 2 * HALF_M // Q_WIDTH
    s_zero = gl.zeros([HALF_M, BLOCK_N], gl.float32, s_layout)
    m_row = HALF * HALF_M + gl.arange(0, HALF_M, layout=gl.SliceLayout(1, s_layout))
    it = 0
    tc = 0
    i = 0
    for w in range(gl.program_id(0), n_work, gl.num_programs(0)):
        bh, qa, qb, kr0, kc0, ke1, n_tiles = _item(w, n_qt, n_qt1, KBOX)
        win = (0, 0, 0, 0, 0, 0, 0, 0, 0)
        if MASKED:
            qy = qa * QT0 + m_row // Q_WIDTH
            qx = qb * Q_WIDTH + m_row % Q_WIDTH
            ext = EXT + ((w % n_qt) * 2 + HALF) * 5  # this warpgroup's rows: window extremes, uniform
            uniform = gl.load(ext + 4)
            # each row's window: key rows [lo0, hi0), key columns [lo1, hi1) of the grid (uniform: unused)
            lo0 = gl.zeros([HALF_M], gl.int32, gl.SliceLayout(1, s_layout))
            hi0 = lo0
            lo1 = lo0
            hi1 = lo0
            if uniform == 0:
                lo0 = gl.load(LO0 + qy)
                hi0 = gl.load(HI0 + qy)
                lo1 = gl.load(LO1 + qx)
                hi1 = gl.load(HI1 + qx)
            win = (lo0, hi0, lo1, hi1, gl.load(ext), gl.load(ext + 1), gl.load(ext + 2), gl.load(ext + 3),
                   uniform != 0)
        qs = i % 2
        q_smem = q_bufs.index(2 * qs + HALF)
        acc = gl.zeros([HALF_M, HEAD_D], gl.float32, o_layout)
        m_i = gl.full([HALF_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([HALF_M], gl.float32, gl.SliceLayout(1, s_layout))
        mbarrier.wait(q_ready.index(qs), (i // 2) & 1)
        # Turn tc is the item's first scores; warpgroup 0 has turn 0 (a fresh barrier's phase-1 wait passes).
        mbarrier.wait(turn.index(HALF), (tc & 1) ^ (1 - HALF))
        mbarrier.wait(k_ready.index(it % NUM_BUF), (it // NUM_BUF) & 1)
        s_t = warpgroup_mma(q_smem, k_bufs.index(it % NUM_BUF).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        mbarrier.arrive(turn.index(1 - HALF), count=1)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s_t, ))
        mbarrier.arrive(k_empty.index(it % NUM_BUF), count=1)
        if not Q_EARLY:
            if i > 0:
                mbarrier.arrive(q_empty.index(1 - qs), count=1)
        ty = kr0  # the tile's first key row and column
        tx = kc0
        for j in range(n_tiles - 1):
            s, acc, m_i, l_i = _step(j, it, tc, ty, tx, s, acc, m_i, l_i, s_zero, q_smem, k_bufs, v_bufs, k_ready,
                                     v_ready, k_empty, v_empty, turn, qk_scale, win, s_layout, o_layout, HALF,
                                     NUM_BUF, True, MASKED, KT0, K_WIDTH)
            ty, tx = _next_tile(ty, tx, kc0, ke1, KT0, K_WIDTH)
        s, acc, m_i, l_i = _step(n_tiles - 1, it, tc, ty, tx, s, acc, m_i, l_i, s_zero, q_smem, k_bufs, v_bufs, k_ready,
                                 v_ready, k_empty, v_empty, turn, qk_scale, win, s_layout, o_layout,
                                 HALF, NUM_BUF, False, MASKED, KT0, K_WIDTH)
        if Q_EARLY:  # the item's last scores are done
            mbarrier.arrive(q_empty.index(qs), count=1)
        if MASKED:  # rows that saw no key are zeros (attnlab's contract), not 0/0
            l_i = gl.where(l_i == 0.0, 1.0, l_i)
        out = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))[:, None]
        o_smem = o_bufs.index(HALF)
        tma.store_wait(0)  # this warpgroup's previous output (an item ago) has left the staging slot
        o_smem.store(out.to(o_smem.dtype))
        fence_async_shared()
        gl.thread_barrier()
        tma.async_copy_shared_to_global(o_desc, [bh * QY + qa * QT0 + HALF * (QT0 // 2),
                                                 qb * Q_WIDTH + HALF * (Q_WIDTH - QH1), 0],
                                        o_smem.reshape(o_desc.block_type.shape))
        it += n_tiles
        tc += n_tiles + 1
        i += 1
    tma.store_wait(0)


@gluon.jit
def local_fwd(Q, K, V, O, KBOX, EXT, LO0, HI0, LO1, HI1, n_q, n_kv, H, GROUPS, n_qt, n_qt1, n_work, q_cols, kv_cols,
              qk_scale, Q_WIDTH: gl.constexpr, K_WIDTH: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
              HEAD_D: gl.constexpr, NUM_BUF: gl.constexpr, CONSUMER_REGS: gl.constexpr, MASKED: gl.constexpr,
              Q_EARLY: gl.constexpr):
    # A persistent grid: program p runs work items p, p + grid, ... (item w = batch x head w // n_qt,
    # query tile w % n_qt); launch with num_warps=4 (the first consumer warpgroup; the second and the
    # producer warp are worker partitions), so one item's loads overlap the previous one's last tiles
    # and store. Q/O hold per (batch, head) a row-major grid of n_q tokens, q_cols per grid row, K/V one of
    # n_kv tokens, kv_cols per row (a 1-D sequence is one row); the kernel sees them as stacks of grid rows,
    # so that a query tile (BLOCK_M // Q_WIDTH rows of Q_WIDTH tokens) or key tile (BLOCK_N // K_WIDTH rows
    # of K_WIDTH) is one TMA box. KBOX (n_q_tiles, 4) int32: the first key row and column of the box of
    # keys the query tile visits and its extent in key tiles along rows and columns, at least one tile.
    # Boxes may run past the grid: those keys are masked (TMA reads zeros past a row or the tensor).
    # MASKED: some tiles are partial; LO0/HI0 (per grid row) and LO1/HI1 (per grid column) bound each
    # query's window in key grid coordinates, EXT (n_q_tiles, 2, 5) int32 holds per query tile and
    # warpgroup half max(lo0), min(hi0), max(lo1), min(hi1) over its rows and whether they all share one
    # window; rows that see no key are zeros. Q_EARLY: when query slots are freed and refilled (see
    # _loader). The host sets it for 1-D tiles only: on an H200 (h200_gluon_s9.md) it made short items
    # with 1-D tiles faster (1-D 256-token blocks 0.097 -> 0.086 ms, 32 x 512 dense 0.143 -> 0.131; but
    # 64 x 256 dense 0.097 -> 0.102) and 2-D ones slower (16x16 blocks 0.100 -> 0.115); long items alike.
    HALF_M: gl.constexpr = BLOCK_M // 2
    QT0: gl.constexpr = BLOCK_M // Q_WIDTH  # query tile: QT0 x Q_WIDTH tokens of the query grid
    KT0: gl.constexpr = BLOCK_N // K_WIDTH
    QH0: gl.constexpr = (QT0 + 1) // 2  # a warpgroup's half: QH0 x QH1 tokens (half the rows, or half the row)
    QH1: gl.constexpr = HALF_M // QH0
    dt: gl.constexpr = Q.dtype.element_ty
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([HALF_M, HEAD_D], dt)
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_D], dt)
    qh_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([QH0, QH1, HEAD_D], dt)
    kt_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([KT0, K_WIDTH, HEAD_D], dt)
    n_bh = n_work // n_qt
    QY = n_q // q_cols
    KY = n_kv // kv_cols
    # q/o/k/v as stacks of token grids (heads' grids one after another along the rows): a tile is one box
    q_desc = tma.make_tensor_descriptor(Q, [n_bh * QY, q_cols, HEAD_D], [q_cols * HEAD_D, HEAD_D, 1],
                                        [QH0, QH1, HEAD_D], qh_layout)
    o_desc = tma.make_tensor_descriptor(O, [n_bh * QY, q_cols, HEAD_D], [q_cols * HEAD_D, HEAD_D, 1],
                                        [QH0, QH1, HEAD_D], qh_layout)
    k_desc = tma.make_tensor_descriptor(K, [(n_bh // GROUPS) * KY, kv_cols, HEAD_D],
                                        [kv_cols * HEAD_D, HEAD_D, 1], [KT0, K_WIDTH, HEAD_D], kt_layout)
    v_desc = tma.make_tensor_descriptor(V, [(n_bh // GROUPS) * KY, kv_cols, HEAD_D],
                                        [kv_cols * HEAD_D, HEAD_D, 1], [KT0, K_WIDTH, HEAD_D], kt_layout)

    q_bufs = gl.allocate_shared_memory(dt, [4, HALF_M, HEAD_D], q_layout)  # two items, two halves each
    o_bufs = gl.allocate_shared_memory(dt, [2, HALF_M, HEAD_D], q_layout)  # each warpgroup's output staging
    k_bufs = gl.allocate_shared_memory(dt, [NUM_BUF, BLOCK_N, HEAD_D], kv_layout)
    v_bufs = gl.allocate_shared_memory(dt, [NUM_BUF, BLOCK_N, HEAD_D], kv_layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=2)  # both warpgroups read every query tile
        mbarrier.init(turn.index(i), count=1)
    for i in gl.static_range(NUM_BUF):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)
        mbarrier.init(v_empty.index(i), count=2)

    gl.warp_specialize([
        (_consumer, (0, q_bufs, o_bufs, k_bufs, v_bufs, q_ready, q_empty, k_ready, v_ready, k_empty, v_empty, turn,
                     o_desc, KBOX, EXT, LO0, HI0, LO1, HI1, QY, n_qt, n_qt1, n_work, qk_scale,
                     HALF_M, BLOCK_N, HEAD_D, Q_WIDTH, K_WIDTH, NUM_BUF, MASKED, QH1, Q_EARLY)),
        (_consumer, (1, q_bufs, o_bufs, k_bufs, v_bufs, q_ready, q_empty, k_ready, v_ready, k_empty, v_empty, turn,
                     o_desc, KBOX, EXT, LO0, HI0, LO1, HI1, QY, n_qt, n_qt1, n_work, qk_scale,
                     HALF_M, BLOCK_N, HEAD_D, Q_WIDTH, K_WIDTH, NUM_BUF, MASKED, QH1, Q_EARLY)),
        (_loader, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_ready, q_empty, k_ready, v_ready, k_empty,
                   v_empty, KBOX, QY, KY, H, GROUPS, n_qt, n_qt1, n_work, QT0, Q_WIDTH, QH0, QH1, KT0, K_WIDTH,
                   NUM_BUF, Q_EARLY)),
    ], [4, 1], [CONSUMER_REGS, 40])
