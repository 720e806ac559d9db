"""Backward kernels, FlashAttention-2's scheme without atomics (bitwise deterministic):

1. delta = rowsum(dO * O)                                  one program per (query tile, batch * query head)
2. dK, dV: K and V tiles stay resident; loop over the query heads of the GQA group and over the query tiles
   that see the key tile                                    one program per (key tile, batch * kv head)
3. dQ: Q, dO tiles stay resident; loop over the visible key tiles
                                                            one program per (query tile, batch * query head)

P is recomputed from the forward's per-row stats (max m of the unscaled scores, log2 l of the denominator):
P = exp2((S - m) * scale * log2(e) - log2 l), S the scores after the modifiers (common._score); the softcap's
derivative 1 - tanh^2 multiplies dS, and dropout's keep-mask is drawn again from the forward's seed and offset.
"""
import triton
import triton.language as tl

from .common import (_at_head, _at_rows, _block_bits, _block_range, _dot, _keep, _key_walk, _listed_range,
                     _load_block, _load_tile, _query_head, _rng, _score, _segment_range, _sequence, _sink, _slope,
                     _step_tile, _store_tile, _tile_at, _tile_mask, _tiles, _visible)
from .configs import KernelConfig, backward_config, capability, cdiv, head_block, head_chunks
from .launch import (LOG2E, ModArgs, SeqArgs, Sched, block_args, block_tiles, flags, function_args, grid_dims,
                     modifier_args, reverse_tiles, run, tile_args, tile_grid)


@triton.jit
def _attn_bwd_preprocess_kernel(O, DO, DELTA, STATS, SINKS, DSINK, DLSE, so, sdo, head_start, n_heads, seqlen_q,
                                qk_scale, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
                                F: tl.constexpr):
    """delta = rowsum(dO * O); with sinks (F.HAS_SINKS), also each row's term of its head's sink gradient, -P_sink *
    delta (P_sink = exp(sink - lse), from the forward's stats; at most 1, also on rows no packed sequence covers).
    With a gradient dLSE of the lse (F.HAS_DLSE; rows as delta's), delta - dLSE: d lse / d s_ij = P_ij, so
    dS = P * (dP - delta) + dLSE * P = P * (dP - (delta - dLSE)), for the scores and the sinks alike. so / sdo:
    O's and dO's (batch, head, row, col) strides."""
    bh = tl.program_id(1) + head_start
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    o = _load_tile(O + b * so[0] + h * so[1], offs_m, offs_dv, so[2], so[3], seqlen_q, HEAD_DIM_V,
                   True, HEAD_DIM_V != BLOCK_DV)
    do = _load_tile(DO + b * sdo[0] + h * sdo[1], offs_m, offs_dv, sdo[2], sdo[3], seqlen_q,
                    HEAD_DIM_V, True, HEAD_DIM_V != BLOCK_DV)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    rows = bh.to(tl.int64) * seqlen_q + offs_m
    if F.HAS_DLSE:
        delta -= tl.load(DLSE + rows, mask=offs_m < seqlen_q, other=0.0)
    tl.store(DELTA + rows, delta, mask=offs_m < seqlen_q)
    if F.HAS_SINKS:
        m = tl.load(STATS + 2 * rows, mask=offs_m < seqlen_q, other=0.0)
        log2_l = tl.load(STATS + 2 * rows + 1, mask=offs_m < seqlen_q, other=0.0)
        p_sink = tl.minimum(tl.math.exp2((_sink(SINKS, h, qk_scale, True) - m) * qk_scale - log2_l), 1.0)
        tl.store(DSINK + rows, -p_sink * delta, mask=offs_m < seqlen_q)


@triton.jit
def _key_tile_mask(offs_m, offs_n, bits, seq, blocks, mrow, entry, b, h, F: tl.constexpr):
    """The mask of a (key rows offs_n, query columns offs_m) tile of the dK/dV kernel: the band, and on a block
    mask its bits (read already, `bits`) or F.MASK_MOD."""
    seqlen_q, seqlen_k, offset, left, right = seq
    ok = _visible(offs_m[None, :], offs_n[:, None], seqlen_q, seqlen_k, offset, left, right, F.HAS_LEFT,
                  F.HAS_RIGHT)
    if F.LISTED:
        if F.MASK_MOD is not None:
            bits = _block_bits(blocks.SLOTS, mrow, blocks.BITS, entry, offs_m[None, :], offs_n[:, None],
                               blocks.block_q, blocks.block_k, b, h, seqlen_q, seqlen_k, F.MASK_MOD, blocks.MASK_ARGS)
        ok = ok & bits
    return ok


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, Q, DO, STATS, DELTA, b, h0, heads, sq, sdo, stride_lh, offs_n, walk, seq,
                         qk_scale, mods, rng, blocks, mrow, C: tl.constexpr, F: tl.constexpr):
    """Query tiles walk = (lo, hi, full_lo, full_hi) of query heads h0 .. h0 + heads - 1, accumulated into the key
    tile's dK (if C.WITH_DK) and dV (if C.WITH_DV); Q, DO, STATS, DELTA at head h0 (a descriptor of its rows where
    C.TMA == 2: then heads is 1), sq / sdo their (batch, head, row, col) strides; seq = (seqlen_q, seqlen_k, offset,
    left, right); rng = dropout's (seed, offset) and Hq (a head's stream: b * Hq + h). One loop over (head, query tile) pairs, heads outermost: tiles
    outside [full_lo, full_hi) apply the mask, decided per tile at run time. (Three loops, as in the forward, keep
    more registers live across them: the dK/dV kernel spilled that way on sm_90, 40-688 bytes at D = 64 / 128 by
    the compile-time gate; one loop is clean. A loop per head spills on sm_100, where the accumulator leaves tensor
    memory between them: 304 bytes for dK at D = 256, GQA 8.) F.LISTED: positions in the block mask's list of this
    key block's query blocks (ascending; [full_lo, full_hi) the full ones, the rest masked with their bits).
    C.WARP_SPEC: the loop warp-specialized, every tile masked (no branch in the loop)."""
    lo, hi, full_lo, full_hi = walk
    seqlen_q, seqlen_k, offset, left, right = seq
    seed, rng_offset, n_heads = rng
    BLOCK_M: tl.constexpr = C.BLOCK_M
    n_pos = tl.cdiv(hi - lo, BLOCK_M)
    for i in tl.range(0, heads * n_pos, warp_specialize=C.WARP_SPEC):
        g = i // n_pos
        pos = lo + (i - g * n_pos) * BLOCK_M
        h = h0 + g
        g64 = g.to(tl.int64)
        start_m, entry = _tile_at(pos, blocks, mrow, False, F.LISTED)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_block(_at_head(Q, g64 * sq[1], C.TMA), b, h, start_m, sq[2], sq[3], seqlen_q, C.HEAD_DIM,
                        BLOCK_M, C.BLOCK_D, True, C.HEAD_DIM != C.BLOCK_D, C.TMA)
        do = _load_block(_at_head(DO, g64 * sdo[1], C.TMA), b, h, start_m, sdo[2], sdo[3], seqlen_q,
                         C.HEAD_DIM_V, BLOCK_M, C.BLOCK_DV, True, C.HEAD_DIM_V != C.BLOCK_DV, C.TMA)
        q_ok = offs_m < seqlen_q
        stats = STATS + 2 * g64 * stride_lh
        m = tl.load(stats + offs_m * 2, mask=q_ok, other=0.0)
        log2_l = tl.load(stats + offs_m * 2 + 1, mask=q_ok, other=0.0)
        slope = _slope(mods.SLOPES, b, h, mods.slope_strides[0], mods.slope_strides[1], qk_scale, F.ALIBI)
        if C.FP32_DOT:  # q k^T as in the forward, so P matches its stats to the last bit (visible in fp32)
            st = tl.trans(_dot(q, tl.trans(k), C.FP32_DOT))
        else:
            st = _dot(k, tl.trans(q), C.FP32_DOT)
        st, dcap = _score(st, offs_m[None, :], offs_n[:, None], offset, slope, b, h, seqlen_q, seqlen_k, qk_scale,
                          mods, F)
        pt = tl.math.exp2((st - m[None, :]) * qk_scale - log2_l[None, :])
        if F.LISTED and F.MASK_MOD is None:  # read outside the branch below: the pipeliner makes it asynchronous
            bits = _block_bits(blocks.SLOTS, mrow, blocks.BITS, entry, offs_m[None, :], offs_n[:, None],
                               blocks.block_q, blocks.block_k, b, h, seqlen_q, seqlen_k, F.MASK_MOD, blocks.MASK_ARGS)
        else:
            bits = None
        if C.WARP_SPEC:  # no branch in a warp-specialized loop: every tile masked (the identity on full tiles)
            pt = tl.where(_key_tile_mask(offs_m, offs_n, bits, seq, blocks, mrow, entry, b, h, F), pt, 0.0)
        elif (pos < full_lo) | (pos >= full_hi):
            pt = tl.where(_key_tile_mask(offs_m, offs_n, bits, seq, blocks, mrow, entry, b, h, F), pt, 0.0)
        if F.DROPOUT:  # out = (P * keep / (1 - p)) V: dV sees the dropped P, dP only its kept entries
            keep = _keep(seed, rng_offset, b * n_heads + h, offs_m[None, :], offs_n[:, None], mods.threshold)
        if C.WITH_DV:
            pdt = pt
            if F.DROPOUT:
                pdt = tl.where(keep, pt * mods.drop_scale, 0.0)
            dv += _dot(pdt.to(do.dtype), do, C.FP32_DOT)
        if C.WITH_DK:
            delta = tl.load(DELTA + g64 * stride_lh + offs_m, mask=q_ok, other=0.0)
            dpt = _dot(v, tl.trans(do), C.FP32_DOT)
            if F.DROPOUT:
                dpt = tl.where(keep, dpt * mods.drop_scale, 0.0)
            dst = pt * (dpt - delta[None, :])
            if F.SOFTCAP or F.SCORE_GRAD is not None:
                dst = dst * dcap
            dk += _dot(dst.to(q.dtype), q, C.FP32_DOT)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_tile(start_n, bhk, Q, K, V, DO, STATS, DELTA, DK, DV, strides, seqs, sched, mods, blocks, scale,
                        qk_scale, C: tl.constexpr, F: tl.constexpr):
    """dK (if C.WITH_DK) and dV (if C.WITH_DV) of the key tile at rows start_n.. of kv head bhk = b * Hkv + hk: both
    in one program, or in two launches where the two accumulators together do not fit the registers
    (KernelConfig.split_dkdv)."""
    sq, sk, sv, sdo, sdk, sdv, sl = strides
    group = sched.group
    n_kv_heads = sched.n_heads // group
    b = bhk // n_kv_heads
    hk = bhk % n_kv_heads
    q0, k0, seqlen_q, seqlen_k, offset = _sequence(seqs.CU_Q, seqs.CU_K, b, seqs.seqlen_q, seqs.seqlen_k,
                                                   seqs.offset, F.VARLEN)
    if F.VARLEN:
        if start_n >= seqlen_k:
            return
    BLOCK_N: tl.constexpr = C.BLOCK_N
    b64, hk64 = b.to(tl.int64), hk.to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, C.BLOCK_D)
    offs_dv = tl.arange(0, C.BLOCK_DV)
    Kh = _at_rows(K, b64 * sk[0] + hk64 * sk[1] + k0 * sk[2], seqlen_k, sk[2], C.HEAD_DIM, BLOCK_N, C.BLOCK_D, C.TMA)
    Vh = _at_rows(V, b64 * sv[0] + hk64 * sv[1] + k0 * sv[2], seqlen_k, sv[2], C.HEAD_DIM_V, BLOCK_N, C.BLOCK_DV,
                  C.TMA)
    k = _load_block(Kh, b, hk, start_n, sk[2], sk[3], seqlen_k, C.HEAD_DIM, BLOCK_N, C.BLOCK_D,
                    True, C.HEAD_DIM != C.BLOCK_D, C.TMA)
    v = k  # not read where WITH_DK is off: the dV pass needs no v
    if C.WITH_DK:
        v = _load_block(Vh, b, hk, start_n, sv[2], sv[3], seqlen_k, C.HEAD_DIM_V, BLOCK_N, C.BLOCK_DV,
                        True, C.HEAD_DIM_V != C.BLOCK_DV, C.TMA)
    BLOCK_D: tl.constexpr = C.BLOCK_D  # named: Triton 3.6 takes no tuple field in a shape list
    BLOCK_DV: tl.constexpr = C.BLOCK_DV
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)

    left, right = seqs.left, seqs.right
    if not F.LISTED:  # query tiles that see this key tile: the mask transposed (offset -> -offset, left <-> right)
        lo, full_lo, full_hi, hi = _block_range(start_n, seqlen_k, seqlen_q, -offset, right, left,
                                                BLOCK_N, C.BLOCK_M, F.HAS_RIGHT, F.HAS_LEFT)
    seed, rng_offset = _rng(mods.RNG, F.DROPOUT)
    rng = (seed, rng_offset, sched.n_heads)
    seq = (seqlen_q, seqlen_k, offset, left, right)
    # The GQA group's query heads, summed here instead of with atomics: all in one loop (_attn_bwd_dkdv_inner), or a
    # loop per head where their ranges differ (a block mask's lists) or the loop reads through descriptors of one
    # head's rows (warp-specialized).
    loops = 1  # a constant: the one loop, with no loop around it
    per_loop = group
    if F.LISTED or C.WARP_SPEC:
        loops = group
        per_loop = 1
    for g in range(loops):
        h = hk * group + g
        h64 = h.to(tl.int64)
        mrow = b64 * 0
        if F.LISTED:  # this head's query blocks that see this key tile's block
            mrow = b64 * blocks.strides[0] + h64 * blocks.strides[1] + (start_n // blocks.block_k) * blocks.strides[2]
            lo, full_lo, full_hi, hi = _listed_range(blocks.TABLE + mrow, blocks.block_q)
        Qh = _at_rows(Q, b64 * sq[0] + h64 * sq[1] + q0 * sq[2], seqlen_q, sq[2], C.HEAD_DIM, C.BLOCK_M, C.BLOCK_D,
                      C.TMA)
        DOh = _at_rows(DO, b64 * sdo[0] + h64 * sdo[1] + q0 * sdo[2], seqlen_q, sdo[2], C.HEAD_DIM_V, C.BLOCK_M,
                       C.BLOCK_DV, C.TMA)
        row = b64 * sl[0] + h64 * sl[1] + q0
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Qh, DOh, STATS + 2 * row, DELTA + row, b, h, per_loop, sq, sdo,
                                      sl[1], offs_n, (lo, hi, full_lo, full_hi), seq, qk_scale, mods, rng, blocks,
                                      mrow, C, F)

    if C.WITH_DK:
        _store_tile(DK + b64 * sdk[0] + hk64 * sdk[1] + k0 * sdk[2], dk * scale, offs_n, offs_d, sdk[2], sdk[3],
                    seqlen_k, C.HEAD_DIM, C.HEAD_DIM != C.BLOCK_D)
    if C.WITH_DV:
        _store_tile(DV + b64 * sdv[0] + hk64 * sdv[1] + k0 * sdv[2], dv, offs_n, offs_dv, sdv[2], sdv[3], seqlen_k,
                    C.HEAD_DIM_V, C.HEAD_DIM_V != C.BLOCK_DV)


DKDV_FLAGS = ("HAS_LEFT", "HAS_RIGHT", "VARLEN", "SOFTCAP", "ALIBI", "DROPOUT", "LISTED")


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, STATS, DELTA, DK, DV, strides, seqs, sched, mods, blocks, scale, qk_scale,
                          C: tl.constexpr, F: tl.constexpr):
    """dK (if C.WITH_DK) and dV (if C.WITH_DV) of the key tiles: one per program (grid: tiles x kv heads), or
    C.PERSISTENT: a program per SM walking the tiles (_walk_tile; dense calls only); one loop either way (_tiles).
    strides: (batch, head, row, col) of q, k, v, dO, dK, dV, and the stats' batch and head strides."""
    n_tiles = tl.cdiv(seqs.seqlen_k, C.BLOCK_N)
    first, end, step = _tiles(n_tiles * sched.head_count, C)
    for t in range(first, end, step):
        start_n, bhk = _step_tile(t, n_tiles, sched, C.BLOCK_N, C)
        _attn_bwd_dkdv_tile(start_n, bhk, Q, K, V, DO, STATS, DELTA, DK, DV, strides, seqs, sched, mods, blocks,
                            scale, qk_scale, C, F)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, stats, K, V, kv, offs_m, lo, hi, seq, qk_scale, mods, rows, blocks, mrow, DBIAS,
                       stride_dbs, C: tl.constexpr, F: tl.constexpr, MASKED: tl.constexpr):
    """Key tiles [lo, hi) accumulated into one query tile's dQ (F.LISTED: positions in a block mask's list, as in
    the forward's inner loop, whose kv, seq and rows this takes, without pages and descale); stats = the rows' (m,
    log2 l, delta). F.BIAS_GRAD: each tile's dS, the gradient of the modified scores (a bias's, before the sum
    over the dimensions it broadcasts over), is also written to DBIAS (rows stride_dbs apart). C.WARP_SPEC: the
    loop warp-specialized (as the forward's: one loop, every tile MASKED)."""
    b, hk, sk, sv = kv
    seqlen_q, seqlen_k, offset, left, right = seq
    h, bh, slope, seed, rng_offset = rows
    m, log2_l, delta = stats
    for pos in tl.range(lo, hi, C.BLOCK_N, warp_specialize=C.WARP_SPEC):
        start_n, entry = _tile_at(pos, blocks, mrow, True, F.LISTED)
        offs_n = start_n + tl.arange(0, C.BLOCK_N)
        k = _load_block(K, b, hk, start_n, sk[0], sk[1], seqlen_k, C.HEAD_DIM, C.BLOCK_N, C.BLOCK_D,
                        MASKED, C.HEAD_DIM != C.BLOCK_D, C.TMA)
        v = _load_block(V, b, hk, start_n, sv[0], sv[1], seqlen_k, C.HEAD_DIM_V, C.BLOCK_N, C.BLOCK_DV,
                        MASKED, C.HEAD_DIM_V != C.BLOCK_DV, C.TMA)
        s, dcap = _score(_dot(q, tl.trans(k), C.FP32_DOT), offs_m[:, None], offs_n[None, :], offset, slope, b, h,
                         seqlen_q, seqlen_k, qk_scale, mods, F)
        p = tl.math.exp2((s - m[:, None]) * qk_scale - log2_l[:, None])
        if MASKED:
            p = tl.where(_tile_mask(offs_m[:, None], offs_n[None, :], seq, blocks, mrow, entry, b, h, F), p, 0.0)
        dp = _dot(do, tl.trans(v), C.FP32_DOT)
        if F.DROPOUT:
            dp = tl.where(_keep(seed, rng_offset, bh, offs_m[:, None], offs_n[None, :], mods.threshold),
                          dp * mods.drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if F.BIAS_GRAD:
            tl.store(DBIAS + offs_m[:, None] * stride_dbs + offs_n[None, :], ds,
                     mask=(offs_m[:, None] < seqlen_q) & (offs_n[None, :] < seqlen_k))
        if F.SOFTCAP or F.SCORE_GRAD is not None:
            ds = ds * dcap
        dq += _dot(ds.to(k.dtype), k, C.FP32_DOT)
    return dq


@triton.jit
def _attn_bwd_dq_tile(start_m, bh, Q, K, V, DO, STATS, DELTA, DQ, DBIAS, strides, seqs, sched, mods, blocks, scale,
                      qk_scale, C: tl.constexpr, F: tl.constexpr):
    """dQ of the query tile at rows start_m.. of head bh = b * Hq + h."""
    sq, sk, sv, sdo, sdq, sl, sdb = strides
    b, h, hk = _query_head(bh, sched.n_heads, sched.group)
    q0, k0, seqlen_q, seqlen_k, offset = _sequence(seqs.CU_Q, seqs.CU_K, b, seqs.seqlen_q, seqs.seqlen_k,
                                                   seqs.offset, F.VARLEN)
    if F.VARLEN:
        if start_m >= seqlen_q:
            return
    BLOCK_M: tl.constexpr = C.BLOCK_M
    b64, h64, hk64 = b.to(tl.int64), h.to(tl.int64), hk.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, C.BLOCK_D)
    m_ok = offs_m < seqlen_q
    q = _load_block(_at_rows(Q, b64 * sq[0] + h64 * sq[1] + q0 * sq[2], seqlen_q, sq[2], C.HEAD_DIM, BLOCK_M,
                             C.BLOCK_D, C.TMA), b, h, start_m, sq[2], sq[3], seqlen_q, C.HEAD_DIM, BLOCK_M, C.BLOCK_D,
                    True, C.HEAD_DIM != C.BLOCK_D, C.TMA)
    do = _load_block(_at_rows(DO, b64 * sdo[0] + h64 * sdo[1] + q0 * sdo[2], seqlen_q, sdo[2], C.HEAD_DIM_V,
                              BLOCK_M, C.BLOCK_DV, C.TMA), b, h, start_m, sdo[2], sdo[3], seqlen_q, C.HEAD_DIM_V,
                     BLOCK_M, C.BLOCK_DV, True, C.HEAD_DIM_V != C.BLOCK_DV, C.TMA)
    row = b64 * sl[0] + h64 * sl[1] + q0
    m = tl.load(STATS + 2 * (row + offs_m), mask=m_ok, other=0.0)
    log2_l = tl.load(STATS + 2 * (row + offs_m) + 1, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + row + offs_m, mask=m_ok, other=0.0)
    BLOCK_D: tl.constexpr = C.BLOCK_D  # named: Triton 3.6 takes no tuple field in a shape list
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    Kh = _at_rows(K, b64 * sk[0] + hk64 * sk[1] + k0 * sk[2], seqlen_k, sk[2], C.HEAD_DIM, C.BLOCK_N, C.BLOCK_D,
                  C.TMA)
    Vh = _at_rows(V, b64 * sv[0] + hk64 * sv[1] + k0 * sv[2], seqlen_k, sv[2], C.HEAD_DIM_V, C.BLOCK_N, C.BLOCK_DV,
                  C.TMA)
    left, right = seqs.left, seqs.right
    mrow, lo, full_lo, full_hi, hi = _key_walk(blocks, b64, h64, start_m, seqlen_q, seqlen_k, offset, left, right,
                                               C, F)
    slope = _slope(mods.SLOPES, b, h, mods.slope_strides[0], mods.slope_strides[1], qk_scale, F.ALIBI)
    seed, rng_offset = _rng(mods.RNG, F.DROPOUT)
    if F.BIAS_GRAD:
        DBIAS += b64 * sdb[0] + h64 * sdb[1]
    kv = (b, hk, (sk[2], sk[3]), (sv[2], sv[3]))
    seq = (seqlen_q, seqlen_k, offset, left, right)
    rows = (h, bh, slope, seed, rng_offset)
    for seg in tl.static_range(1 if C.WARP_SPEC else 3):  # as the forward's segments
        seg_lo, seg_hi = _segment_range(seg, lo, full_lo, full_hi, hi, C.WARP_SPEC)
        dq = _attn_bwd_dq_inner(dq, q, do, (m, log2_l, delta), Kh, Vh, kv, offs_m, seg_lo, seg_hi, seq, qk_scale,
                                mods, rows, blocks, mrow, DBIAS, sdb[2], C, F, C.WARP_SPEC or seg != 1)

    _store_tile(DQ + b64 * sdq[0] + h64 * sdq[1] + q0 * sdq[2], dq * scale, offs_m, offs_d, sdq[2], sdq[3], seqlen_q,
                C.HEAD_DIM, C.HEAD_DIM != C.BLOCK_D)


DQ_FLAGS = ("HAS_LEFT", "HAS_RIGHT", "VARLEN", "SOFTCAP", "ALIBI", "DROPOUT", "LISTED", "BIAS_GRAD")


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, STATS, DELTA, DQ, DBIAS, strides, seqs, sched, mods, blocks, scale, qk_scale,
                        C: tl.constexpr, F: tl.constexpr):
    """dQ of the query tiles: one per program (grid: tiles x heads), or C.PERSISTENT: a program per SM walking the
    tiles (_walk_tile; dense calls only); one loop either way (_tiles). strides: (batch, head, row, col) of q, k, v,
    dO, dQ; the stats' batch and head strides; DBIAS's batch, head and row strides (F.BIAS_GRAD)."""
    n_tiles = tl.cdiv(seqs.seqlen_q, C.BLOCK_M)
    first, end, step = _tiles(n_tiles * sched.head_count, C)
    for t in range(first, end, step):
        start_m, bh = _step_tile(t, n_tiles, sched, C.BLOCK_M, C)
        _attn_bwd_dq_tile(start_m, bh, Q, K, V, DO, STATS, DELTA, DQ, DBIAS, strides, seqs, sched, mods, blocks,
                          scale, qk_scale, C, F)


PREPROCESS_FLAGS = ("HAS_SINKS", "HAS_DLSE")


def backward_launches(do, q, k, v, out, stats, dq, dk, dv, delta, scale: float, offset: int, left: int,
                      right: int, cfgs, packed=None, mods=None, blocks=None, dbias=None, dsink=None, dlse=None):
    """The backward's kernel launches (preprocess, dK/dV, dQ) as (kernel, grid, args, kwargs), for
    attention_backward and the compile-time gate. cfgs = (dK/dV config, dQ config); dbias: (B, Hq, Sq, Sk) float32
    (rows contiguous) that the dQ kernel fills with dS where the bias (mods.bias) needs a gradient; dsink: (B, Hq, Sq)
    float32 contiguous, each row's term of the sinks' gradient (with mods.sinks); dlse: (B, Hq, Sq) float32
    contiguous, the gradient of the lse, or None."""
    (B, Sq, Sk), cu, strides = grid_dims(q, k, packed)
    mod_args, fns = modifier_args(mods, scale), function_args(mods, blocks)
    Hq, Hkv, Dv = q.shape[1], k.shape[1], v.shape[3]
    c_kv, c_q = (block_tiles(c, blocks) for c in cfgs)
    # delta = rowsum(dO * O) needs no sequence bounds: over every row of the (B, Hq, S) slices, packed or not.
    sinks = None if mods is None or dsink is None else mods.sinks  # the sinks' gradient terms, where asked for
    launch_list = [(_attn_bwd_preprocess_kernel, (cdiv(q.shape[2], c_q.block_m), count),
                    (out, do, delta, stats, sinks, dsink, dlse, tuple(out.stride()), tuple(do.stride()), start, Hq,
                     q.shape[2], scale * LOG2E),
                    dict(HEAD_DIM_V=Dv, BLOCK_M=c_q.block_m, BLOCK_DV=head_block(Dv),
                         F=flags(PREPROCESS_FLAGS, mods=ModArgs(SINKS=sinks), DLSE=dlse)))
                   for start, count in head_chunks(q.shape[0] * Hq)]
    seqs = SeqArgs(Sq, Sk, offset, left, right, *cu)
    rows = strides(delta)[:2]

    # Key tiles: the mask transposed.
    t_blocks = block_args(blocks, transposed=True)
    src, tile, opts = tile_args(c_kv, reverse_tiles(right, left), q, k, v, do, packed is not None)
    passes = [dict(WITH_DK=False, WITH_DV=True), dict(WITH_DK=True, WITH_DV=False)] if c_kv.split_dkdv else [{}]
    dkdv_strides = (strides(q), strides(k), strides(v), strides(do), strides(dk), strides(dv), rows)
    for which in passes:
        for start, count in head_chunks(B * Hkv) if Sk > 0 else ():
            sched = Sched(start, count, Hq, Hq // Hkv)
            f = flags(DKDV_FLAGS, fns, seqs=seqs, mods=mod_args, blocks=t_blocks)
            launch_list.append((_attn_bwd_dkdv_kernel, tile_grid(tile, cdiv(Sk, c_kv.block_n), count, q.device),
                                (*src, stats, delta, dk, dv, dkdv_strides, seqs, sched, mod_args, t_blocks, scale,
                                 scale * LOG2E), dict(C=tile._replace(**which), F=f, **opts)))

    mask_args = block_args(blocks)
    src, tile, opts = tile_args(c_q, reverse_tiles(left, right), q, k, v, do, packed is not None)
    dq_strides = (strides(q), strides(k), strides(v), strides(do), strides(dq), rows,
                  tuple(dbias.stride()[:3]) if dbias is not None else (0, 0, 0))
    for start, count in head_chunks(B * Hq) if Sq > 0 else ():
        sched = Sched(start, count, Hq, Hq // Hkv)
        f = flags(DQ_FLAGS, fns, seqs=seqs, mods=mod_args, blocks=mask_args, DBIAS=dbias)
        launch_list.append((_attn_bwd_dq_kernel, tile_grid(tile, cdiv(Sq, c_q.block_m), count, q.device),
                            (*src, stats, delta, dq, dbias, dq_strides, seqs, sched, mod_args, mask_args, scale,
                             scale * LOG2E), dict(C=tile, F=f, **opts)))
    return launch_list


def attention_backward(do, q, k, v, out, stats, dq, dk, dv, delta, scale: float, offset: int, left: int,
                       right: int, config=None, packed=None, mods=None, blocks=None, dbias=None, dsink=None,
                       dlse=None):
    """Launch the three backward kernels on (B, H, S, D)-indexed views (any strides), with the forward's stats;
    writes dq, dk, dv and the float32 scratch delta (B, Hq, Sq, contiguous). Packed sequences as in
    attention_forward: rows no sequence covers get no gradient written. `config` overrides configs.py: one
    KernelConfig for both the dK/dV and the dQ kernel, or a pair (dK/dV, dQ). `mods`: the forward's Modifiers (the
    same rng: the backward regenerates the forward's dropout mask). `blocks`: the forward's block mask. `dbias`:
    where given, filled with the gradient of the scores after the modifiers; `dsink`, with sinks, each row's term
    of their gradient; `dlse`, the gradient of the lse where it has one (see backward_launches)."""
    if config is None:
        config = backward_config(q.shape[3], v.shape[3], q.dtype, capability(q.device), packed is not None,
                                 mods is not None and mods.dropout)
    cfgs = (config, config) if isinstance(config, KernelConfig) else tuple(config)
    run(backward_launches(do, q, k, v, out, stats, dq, dk, dv, delta, scale, offset, left, right, cfgs, packed,
                          mods, blocks, dbias, dsink, dlse), "bwd")
    return dq, dk, dv
