"""Gluon source of the ping-pong local-attention kernel for Hopper GPUs; the host side is ``gluon_local.py``.

FlashAttention-3's schedule ("FlashAttention-3: Fast and Accurate Attention with Asynchrony and
Low-precision", Shah et al., 2024), written here from its description in Gluon, Triton's lower-level
dialect: a producer warp copies key/value tiles into a ring of shared-memory slots with TMA, and two
consumer warpgroups, each with half of the query tile, take turns on the tensor cores: while one runs its
softmax, the other's p @ v and next q k^T run. Turns and slots are mbarriers.

Key tiles are boxes of the token grid (1-D runs or 2-D boxes), enumerated per query tile from the corner
and extent of the box of tiles it visits; partial tiles get each row's window as a mask (MASKED), tiles
inside every row's window none. Kept in its own module because Gluon resolves helpers from module globals and
importing it needs Triton with Gluon (3.5+), which attnlab does not require.
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait


@gluon.jit
def _copy_box(desc, bar, buf, origin, row_stride, ROWS: gl.constexpr, CHUNK: gl.constexpr, WIDTH: gl.constexpr):
    # A tile of ROWS * CHUNK tokens: ROWS grid rows of CHUNK contiguous tokens each (WIDTH per grid row
    # of the tile), into consecutive rows of buf; CHUNK is a multiple of 8, which keeps the swizzle.
    for r in gl.static_range(ROWS):
        tma.async_copy_global_to_shared(desc, [origin + ((r * CHUNK) // WIDTH) * row_stride + (r * CHUNK) % WIDTH, 0],
                                        bar, buf.slice(r * CHUNK, CHUNK))


@gluon.jit
def _loader(k_desc, v_desc, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, kv_row0, kf0, kf1, ke1, n_tiles,
            tile_s0, tile_s1, row_stride, K_ROWS: gl.constexpr, K_CHUNK: gl.constexpr, K_WIDTH: gl.constexpr,
            NUM_BUF: gl.constexpr):
    # Producer warp: key then value tile j of the box into ring slot j % NUM_BUF once both warpgroups freed it.
    for j in range(n_tiles):
        s = j % NUM_BUF
        ph = (j // NUM_BUF) & 1
        origin = kv_row0 + (kf0 + j // ke1) * tile_s0 + (kf1 + j % ke1) * tile_s1
        mbarrier.wait(k_empty.index(s), ph ^ 1)  # a fresh barrier counts as freed: the first pass goes through
        mbarrier.expect(k_ready.index(s), K_ROWS * k_desc.block_type.nbytes)
        _copy_box(k_desc, k_ready.index(s), k_bufs.index(s), origin, row_stride, K_ROWS, K_CHUNK, K_WIDTH)
        mbarrier.wait(v_empty.index(s), ph ^ 1)
        mbarrier.expect(v_ready.index(s), K_ROWS * v_desc.block_type.nbytes)
        _copy_box(v_desc, v_ready.index(s), v_bufs.index(s), origin, row_stride, K_ROWS, K_CHUNK, K_WIDTH)


@gluon.jit
def _mask(j, s, win, kf0, kf1, ke1, s_layout: gl.constexpr, KT0: gl.constexpr, K_WIDTH: gl.constexpr):
    # Scores of key tile j outside each row's window -> -inf; a tile inside every row's window is left
    # alone (the bounds' extremes over the rows decide, once per tile).
    lo0, hi0, lo1, hi1, lo0_max, hi0_min, lo1_max, hi1_min = win
    y0 = (kf0 + j // ke1) * KT0
    x0 = (kf1 + j % ke1) * K_WIDTH
    if (y0 < lo0_max) | (y0 + KT0 > hi0_min) | (x0 < lo1_max) | (x0 + K_WIDTH > hi1_min):
        c = gl.arange(0, KT0 * K_WIDTH, layout=gl.SliceLayout(0, s_layout))
        y = (y0 + c // K_WIDTH)[None, :]
        x = (x0 + c % K_WIDTH)[None, :]
        ok = (y >= lo0[:, None]) & (y < hi0[:, None]) & (x >= lo1[:, None]) & (x < hi1[:, None])
        s = gl.where(ok, s, float("-inf"))
    return s


@gluon.jit
def _step(j, s, acc, m_i, l_i, s_zero, q_smem, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, turn,
          qk_scale, win, kf0, kf1, ke1, s_layout: gl.constexpr, o_layout: gl.constexpr, HALF: gl.constexpr,
          NUM_BUF: gl.constexpr, ISSUE_NEXT: gl.constexpr, MASKED: gl.constexpr, KT0: gl.constexpr,
          K_WIDTH: gl.constexpr):
    # Key tile j of one warpgroup: its softmax alone, then p @ v and the next tile's scores as one burst
    # in this warpgroup's turn, so the other warpgroup's burst runs on the tensor cores during this softmax.
    if MASKED:
        s = _mask(j, s, win, kf0, kf1, ke1, s_layout, KT0, K_WIDTH)
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    m_use = m_new
    if MASKED:  # a row with no key yet keeps m = -inf: subtract 0 instead, so exp2 gives 0, not NaN
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    p = gl.exp2(s * qk_scale - m_use[:, None])
    alpha = gl.exp2(m_i - m_use)
    l_i = l_i * alpha + gl.sum(p, 1)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    p16 = gl.convert_layout(p.to(q_smem.dtype), gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2))
    slot = j % NUM_BUF
    mbarrier.wait(v_ready.index(slot), (j // NUM_BUF) & 1)
    mbarrier.wait(turn.index(HALF), ((j + 1) & 1) ^ (1 - HALF))
    acc_t = warpgroup_mma(p16, v_bufs.index(slot), acc, is_async=True)
    if ISSUE_NEXT:
        nxt = (j + 1) % NUM_BUF
        mbarrier.wait(k_ready.index(nxt), ((j + 1) // NUM_BUF) & 1)
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
def _consumer(HALF: gl.constexpr, q_bufs, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, turn, O, o_row0,
              q_origin, q_row_stride, qa, qb, kf0, kf1, ke1, n_tiles, LO0, HI0, LO1, HI1, qk_scale,
              HALF_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, Q_WIDTH: gl.constexpr,
              K_WIDTH: gl.constexpr, NUM_BUF: gl.constexpr, MASKED: gl.constexpr):
    # One consumer warpgroup: rows HALF * HALF_M ... of the query tile against every key tile, then its
    # rows of the output (tile row m is grid row m // Q_WIDTH, column m % Q_WIDTH of the tile).
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_D, 16])
    KT0: gl.constexpr = BLOCK_N // K_WIDTH
    QT0: gl.constexpr = 2 * HALF_M // Q_WIDTH
    m_row = HALF * HALF_M + gl.arange(0, HALF_M, layout=gl.SliceLayout(1, s_layout))
    qy = qa * QT0 + m_row // Q_WIDTH
    qx = qb * Q_WIDTH + m_row % Q_WIDTH
    lo0 = gl.load(LO0 + qy)  # each row's window: key rows [lo0, hi0), key columns [lo1, hi1) of the grid
    hi0 = gl.load(HI0 + qy)
    lo1 = gl.load(LO1 + qx)
    hi1 = gl.load(HI1 + qx)
    win = (lo0, hi0, lo1, hi1, gl.max(lo0, 0), gl.min(hi0, 0), gl.max(lo1, 0), gl.min(hi1, 0))
    q_smem = q_bufs.index(HALF)
    s_zero = gl.zeros([HALF_M, BLOCK_N], gl.float32, s_layout)
    acc = gl.zeros([HALF_M, HEAD_D], gl.float32, o_layout)
    m_i = gl.full([HALF_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([HALF_M], gl.float32, gl.SliceLayout(1, s_layout))
    # Turn 0 is the first tile's scores; warpgroup 0 goes first (a fresh barrier's phase-1 wait passes).
    mbarrier.wait(turn.index(HALF), 1 - HALF)
    mbarrier.wait(k_ready.index(0), 0)
    s_t = warpgroup_mma(q_smem, k_bufs.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    mbarrier.arrive(turn.index(1 - HALF), count=1)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s_t, ))
    mbarrier.arrive(k_empty.index(0), count=1)
    for j in range(n_tiles - 1):
        s, acc, m_i, l_i = _step(j, s, acc, m_i, l_i, s_zero, q_smem, k_bufs, v_bufs, k_ready, v_ready, k_empty,
                                 v_empty, turn, qk_scale, win, kf0, kf1, ke1, s_layout, o_layout, HALF, NUM_BUF,
                                 True, MASKED, KT0, K_WIDTH)
    s, acc, m_i, l_i = _step(n_tiles - 1, s, acc, m_i, l_i, s_zero, q_smem, k_bufs, v_bufs, k_ready, v_ready,
                             k_empty, v_empty, turn, qk_scale, win, kf0, kf1, ke1, s_layout, o_layout, HALF, NUM_BUF,
                             False, MASKED, KT0, K_WIDTH)
    if MASKED:  # rows that saw no key are zeros (attnlab's contract), not 0/0
        l_i = gl.where(l_i == 0.0, 1.0, l_i)
    out = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))[:, None]
    m = HALF * HALF_M + gl.arange(0, HALF_M, layout=gl.SliceLayout(1, o_layout))
    rows = o_row0 + q_origin + (m // Q_WIDTH) * q_row_stride + m % Q_WIDTH
    cols = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, o_layout))
    gl.store(O + rows.to(gl.int64)[:, None] * HEAD_D + cols[None, :], out.to(O.dtype.element_ty))


@gluon.jit
def local_fwd(Q, K, V, O, KBOX, LO0, HI0, LO1, HI1, n_q, n_kv, H, GROUPS, n_qt1, q_tile_s0, q_tile_s1,
              q_row_stride, k_tile_s0, k_tile_s1, k_row_stride, qk_scale,
              Q_ROWS: gl.constexpr, Q_CHUNK: gl.constexpr, Q_WIDTH: gl.constexpr,
              K_ROWS: gl.constexpr, K_CHUNK: gl.constexpr, K_WIDTH: gl.constexpr,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, NUM_BUF: gl.constexpr,
              CONSUMER_REGS: gl.constexpr, MASKED: gl.constexpr):
    # One program per (query tile, batch x head); launch with num_warps=4 (the first consumer warpgroup;
    # the second and the producer warp are worker partitions). Q/O are (B*H*n_q, D) rows, K/V
    # (B*Hkv*n_kv, D). KBOX (n_q_tiles, 4) int32: first key tile (axis 0, axis 1) and extent (axis 0,
    # axis 1) of the box of key tiles the query tile visits, at least one tile. Tile (a, b) starts at token
    # a * tile_s0 + b * tile_s1; a tile is ROWS copies of CHUNK tokens (row_stride apart per WIDTH).
    # MASKED: some tiles are partial; LO0/HI0 (per grid row) and LO1/HI1 (per grid column) bound each
    # query's window in key grid coordinates, and rows that see no key are zeros.
    HALF_M: gl.constexpr = BLOCK_M // 2
    t = gl.program_id(0)
    bh = gl.program_id(1)
    kv_head = (bh // H) * (H // GROUPS) + (bh % H) // GROUPS
    o_row0 = bh * n_q
    kv_row0 = kv_head * n_kv
    qa = t // n_qt1
    qb = t % n_qt1
    q_origin = qa * q_tile_s0 + qb * q_tile_s1
    kf0 = gl.load(KBOX + t * 4)
    kf1 = gl.load(KBOX + t * 4 + 1)
    n_tiles = gl.load(KBOX + t * 4 + 2) * gl.load(KBOX + t * 4 + 3)
    ke1 = gl.load(KBOX + t * 4 + 3)

    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([HALF_M, HEAD_D], Q.dtype.element_ty)
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_D], Q.dtype.element_ty)
    qc_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([Q_CHUNK, HEAD_D], Q.dtype.element_ty)
    kc_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([K_CHUNK, HEAD_D], Q.dtype.element_ty)
    n_bh = gl.num_programs(1)
    q_desc = tma.make_tensor_descriptor(Q, [n_bh * n_q, HEAD_D], [HEAD_D, 1], [Q_CHUNK, HEAD_D], qc_layout)
    k_desc = tma.make_tensor_descriptor(K, [(n_bh // GROUPS) * n_kv, HEAD_D], [HEAD_D, 1], [K_CHUNK, HEAD_D],
                                        kc_layout)
    v_desc = tma.make_tensor_descriptor(V, [(n_bh // GROUPS) * n_kv, HEAD_D], [HEAD_D, 1], [K_CHUNK, HEAD_D],
                                        kc_layout)

    q_bufs = gl.allocate_shared_memory(Q.dtype.element_ty, [2, HALF_M, HEAD_D], q_layout)
    k_bufs = gl.allocate_shared_memory(Q.dtype.element_ty, [NUM_BUF, BLOCK_N, HEAD_D], kv_layout)
    v_bufs = gl.allocate_shared_memory(Q.dtype.element_ty, [NUM_BUF, BLOCK_N, HEAD_D], kv_layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(NUM_BUF):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)  # both warpgroups read every tile
        mbarrier.init(v_empty.index(i), count=2)
    mbarrier.init(turn.index(0), count=1)
    mbarrier.init(turn.index(1), count=1)
    mbarrier.expect(q_bar, Q_ROWS * q_desc.block_type.nbytes)
    for r in gl.static_range(Q_ROWS):  # tile rows r * Q_CHUNK ... land in half (r * Q_CHUNK) // HALF_M
        tma.async_copy_global_to_shared(
            q_desc, [o_row0 + q_origin + ((r * Q_CHUNK) // Q_WIDTH) * q_row_stride + (r * Q_CHUNK) % Q_WIDTH, 0], q_bar,
            q_bufs.index((r * Q_CHUNK) // HALF_M).slice((r * Q_CHUNK) % HALF_M, Q_CHUNK))
    mbarrier.wait(q_bar, 0)

    gl.warp_specialize([
        (_consumer, (0, q_bufs, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, turn, O, o_row0, q_origin,
                     q_row_stride, qa, qb, kf0, kf1, ke1, n_tiles, LO0, HI0, LO1, HI1, qk_scale, HALF_M, BLOCK_N,
                     HEAD_D, Q_WIDTH, K_WIDTH, NUM_BUF, MASKED)),
        (_consumer, (1, q_bufs, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, turn, O, o_row0, q_origin,
                     q_row_stride, qa, qb, kf0, kf1, ke1, n_tiles, LO0, HI0, LO1, HI1, qk_scale, HALF_M, BLOCK_N,
                     HEAD_D, Q_WIDTH, K_WIDTH, NUM_BUF, MASKED)),
        (_loader, (k_desc, v_desc, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, kv_row0, kf0, kf1, ke1,
                   n_tiles, k_tile_s0, k_tile_s1, k_row_stride, K_ROWS, K_CHUNK, K_WIDTH, NUM_BUF)),
    ], [4, 1], [CONSUMER_REGS, 24])
