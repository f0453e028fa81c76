"""Triton source of the lightning-attention forward kernel; host side and docs in ``triton_lightning.py``.

Kept in its own module because importing it needs Triton, which attnlab does not require.
"""
import triton
import triton.language as tl


@triton.jit
def lightning_fwd(
    Q, K, V, O, RATES,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    N, H,
    D: tl.constexpr, DV: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DECAY: tl.constexpr, EVEN_N: tl.constexpr, PREC: tl.constexpr, E_FIRST: tl.constexpr, MASK_IN_LOOP: tl.constexpr,
):
    # One program: one (batch, head) and one tile of BLOCK_DV value columns, walking the sequence
    # block by block with the (D, BLOCK_DV) state KV in registers (fp32) the whole way.
    if E_FIRST:  # the value tiles of one head are neighbouring programs: they share Q, K reads in L2
        pid_e = tl.program_id(0)
        pid_bh = tl.program_id(1)
    else:
        pid_bh = tl.program_id(0)
        pid_e = tl.program_id(1)
    # int64 offsets: B * H * N * D passes 2**31 elements from N = 128K at B=4, H=32, D=128.
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = pid_e * BLOCK_DV + tl.arange(0, BLOCK_DV)
    d_ok = offs_d < D
    e_ok = offs_e < DV
    q_ptrs = Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :]
    k_ptrs = K + b * skb + h * skh + offs_m[:, None] * skn + offs_d[None, :]
    v_ptrs = V + b * svb + h * svh + offs_m[:, None] * svn + offs_e[None, :]
    o_ptrs = O + b * sob + h * soh + offs_m[:, None] * son + offs_e[None, :]

    # Causal mask of a block, with the decay lambda^(t-s) folded in. Only exp of non-positive
    # numbers is taken, so no factor exceeds 1 and nothing overflows for any rate.
    diff = (offs_m[:, None] - offs_m[None, :]).to(tl.float32)
    if DECAY:
        rate = tl.load(RATES + h).to(tl.float32)
        intra = tl.where(diff >= 0, tl.exp(-rate * tl.maximum(diff, 0.0)), 0.0)  # unused when MASK_IN_LOOP
        q_decay = tl.exp(-rate * (offs_m + 1).to(tl.float32))  # lambda^(t+1): state is one block old
        k_decay = tl.exp(-rate * (BLOCK - 1 - offs_m).to(tl.float32))  # lambda^(B-1-s): to block end
        block_decay = tl.exp(-rate * BLOCK)
    else:
        intra = tl.where(diff >= 0, 1.0, 0.0)

    kv = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)
    for start in range(0, N, BLOCK):
        # A ragged last block loads zero rows: zero keys and values add nothing to any output,
        # and the state after the last block is never read, so its decay need not be exact.
        row_ok = (start + offs_m) < N
        if EVEN_N and BLOCK_D == D:
            q = tl.load(q_ptrs)
            k = tl.load(k_ptrs)
        else:
            q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            k = tl.load(k_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if EVEN_N and BLOCK_DV == DV:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=row_ok[:, None] & e_ok[None, :], other=0.0)
        # Row scalings commute with the products, so the decays scale the small results (and V)
        # rather than copies of the (BLOCK, D) Q and K tiles: (Lambda Q) KV = Lambda (Q KV) and
        # (lambda^(B-1-s) K)^T V = K^T (lambda^(B-1-s) V). That keeps register pressure down.
        s = tl.dot(q, tl.trans(k), input_precision=PREC)
        if DECAY and MASK_IN_LOOP:  # re-formed per step: held across the walk it made ptxas spill
            s = tl.where(diff >= 0, s * tl.exp(-rate * tl.maximum(diff, 0.0)), 0.0).to(v.dtype)
        elif MASK_IN_LOOP:
            s = tl.where(diff >= 0, s, 0.0).to(v.dtype)
        else:
            s = (s * intra).to(v.dtype)
        o = tl.dot(q, kv.to(q.dtype), input_precision=PREC)
        if DECAY:
            o = o * q_decay[:, None]  # inter-block part: the state of the blocks before this one
            vd = (v * k_decay[:, None]).to(v.dtype)
            kv = kv * block_decay
        else:
            vd = v
        o = tl.dot(s, v, o, input_precision=PREC)  # plus the intra-block part
        kv = tl.dot(tl.trans(k), vd, kv, input_precision=PREC)
        if EVEN_N and BLOCK_DV == DV:
            tl.store(o_ptrs, o.to(O.dtype.element_ty))
        else:
            tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=row_ok[:, None] & e_ok[None, :])
        q_ptrs += BLOCK * sqn
        k_ptrs += BLOCK * skn
        v_ptrs += BLOCK * svn
        o_ptrs += BLOCK * son
