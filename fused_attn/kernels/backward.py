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
                     _load_block, _load_tile, _program_tile, _query_head, _rng, _score, _segment_range, _sequence,
                     _sink, _slope, _store_tile, _tile_at, _visible, _walk_tile)
from .configs import KernelConfig, backward_config, capability, cdiv, head_block, head_chunks
from .launch import (LOG2E, block_args, block_tiles, features, fp32_dot, function_args, grid_dims,
                     modifier_args, reverse_tiles, run, tile_args, tile_grid)


@features("HAS_SINKS", "HAS_DLSE")
@triton.jit
def _attn_bwd_preprocess_kernel(O, DO, DELTA, STATS, SINKS, DSINK, DLSE,
                                stride_ob, stride_oh, stride_os, stride_od,
                                stride_dob, stride_doh, stride_dos, stride_dod,
                                head_start, n_heads, seqlen_q, qk_scale,
                                HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
                                HAS_SINKS: tl.constexpr, HAS_DLSE: tl.constexpr):
    """delta = rowsum(dO * O); with sinks, also each row's term of its head's sink gradient, -P_sink * delta
    (P_sink = exp(sink - lse), from the forward's stats; at most 1, also on rows no packed sequence covers).
    With a gradient dLSE of the lse (rows as delta's), delta - dLSE: d lse / d s_ij = P_ij, so
    dS = P * (dP - delta) + dLSE * P = P * (dP - (delta - dLSE)), for the scores and the sinks alike."""
    bh = tl.program_id(1) + head_start
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    o = _load_tile(O + b * stride_ob + h * stride_oh, offs_m, offs_dv, stride_os, stride_od, seqlen_q, HEAD_DIM_V,
                   True, HEAD_DIM_V != BLOCK_DV)
    do = _load_tile(DO + b * stride_dob + h * stride_doh, offs_m, offs_dv, stride_dos, stride_dod, seqlen_q,
                    HEAD_DIM_V, True, HEAD_DIM_V != BLOCK_DV)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    rows = bh.to(tl.int64) * seqlen_q + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLSE + rows, mask=offs_m < seqlen_q, other=0.0)
    tl.store(DELTA + rows, delta, mask=offs_m < seqlen_q)
    if HAS_SINKS:
        m = tl.load(STATS + 2 * rows, mask=offs_m < seqlen_q, other=0.0)
        log2_l = tl.load(STATS + 2 * rows + 1, mask=offs_m < seqlen_q, other=0.0)
        p_sink = tl.minimum(tl.math.exp2((_sink(SINKS, h, qk_scale, HAS_SINKS) - m) * qk_scale - log2_l), 1.0)
        tl.store(DSINK + rows, -p_sink * delta, mask=offs_m < seqlen_q)


@triton.jit
def _key_tile_mask(offs_m, offs_n, bits, SLOTS, mrow, BITS, entry, block_q, block_k, b, h, seqlen_q, seqlen_k,
                   offset, left, right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, LISTED: tl.constexpr,
                   MASK_MOD: tl.constexpr, MASK_ARGS):
    """The mask of a (key rows offs_n, query columns offs_m) tile of the dK/dV kernel: the band, and on a block
    mask its bits (read already, `bits`) or MASK_MOD."""
    ok = _visible(offs_m[None, :], offs_n[:, None], seqlen_q, seqlen_k, offset, left, right, HAS_LEFT, HAS_RIGHT)
    if LISTED:
        if MASK_MOD is not None:
            bits = _block_bits(SLOTS, mrow, BITS, entry, offs_m[None, :], offs_n[:, None], block_q, block_k, b, h,
                               seqlen_q, seqlen_k, MASK_MOD, MASK_ARGS)
        ok = ok & bits
    return ok


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, Q, DO, STATS, DELTA, b, h0, heads,
                         stride_qh, stride_qs, stride_qd, stride_doh, stride_dos, stride_dod, stride_lh,
                         offs_n, lo, hi, full_lo, full_hi, seqlen_q, seqlen_k, offset, left, right, qk_scale,
                         HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                         HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, FP32_DOT: tl.constexpr,
                         TMA: tl.constexpr, WITH_DK: tl.constexpr, WITH_DV: tl.constexpr,
                         cap_in, cap_out, SLOPES, stride_ab, stride_ah, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                         seed, rng_offset, n_heads, threshold, drop_scale, DROPOUT: tl.constexpr,
                         TABLE, SLOTS, mrow, BITS, block_q, block_k, LISTED: tl.constexpr,
                         SCORE_MOD: tl.constexpr, SCORE_GRAD: tl.constexpr, SCORE_BOUNDED: tl.constexpr, SCORE_ARGS,
                         MASK_MOD: tl.constexpr, MASK_ARGS, WARP_SPEC: tl.constexpr):
    """Query tiles [lo, hi) of query heads h0 .. h0 + heads - 1, accumulated into the key tile's dK (if WITH_DK)
    and dV (if WITH_DV); Q, DO, STATS, DELTA at head h0 (a descriptor of its rows where TMA == 2: then heads is 1).
    One loop over (head, query tile) pairs, heads outermost: tiles outside [full_lo, full_hi) apply the mask,
    decided per tile at run time. (Three loops, as in the forward, keep more registers live across them: the dK/dV
    kernel spilled that way on sm_90, 40-688 bytes at D = 64 / 128 by the compile-time gate; one loop is clean. A
    loop per head spills on sm_100, where the accumulator leaves tensor memory between them: 304 bytes for dK at
    D = 256, GQA 8.) LISTED: positions in the block mask's list TABLE of this key block's query blocks (ascending;
    [full_lo, full_hi) the full ones, the rest masked with their bits). WARP_SPEC: the loop warp-specialized, every
    tile masked (no branch in the loop)."""
    n_pos = tl.cdiv(hi - lo, BLOCK_M)
    for i in tl.range(0, heads * n_pos, warp_specialize=WARP_SPEC):
        g = i // n_pos
        pos = lo + (i - g * n_pos) * BLOCK_M
        h = h0 + g
        g64 = g.to(tl.int64)
        start_m, entry = _tile_at(pos, TABLE, mrow, block_q, LISTED)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_block(_at_head(Q, g64 * stride_qh, TMA), b, h, start_m, stride_qs, stride_qd, seqlen_q, HEAD_DIM,
                        BLOCK_M, BLOCK_D, True, HEAD_DIM != BLOCK_D, TMA)
        do = _load_block(_at_head(DO, g64 * stride_doh, TMA), b, h, start_m, stride_dos, stride_dod, seqlen_q,
                         HEAD_DIM_V, BLOCK_M, BLOCK_DV, True, HEAD_DIM_V != BLOCK_DV, TMA)
        q_ok = offs_m < seqlen_q
        stats = STATS + 2 * g64 * stride_lh
        m = tl.load(stats + offs_m * 2, mask=q_ok, other=0.0)
        log2_l = tl.load(stats + offs_m * 2 + 1, mask=q_ok, other=0.0)
        slope = _slope(SLOPES, b, h, stride_ab, stride_ah, qk_scale, ALIBI)
        bh = b * n_heads + h
        if FP32_DOT:  # q k^T as in the forward, so P matches its stats to the last bit (visible in fp32)
            st = tl.trans(_dot(q, tl.trans(k), FP32_DOT))
        else:
            st = _dot(k, tl.trans(q), FP32_DOT)
        st, dcap = _score(st, offs_m[None, :], offs_n[:, None], offset, cap_in, cap_out, slope, SOFTCAP, ALIBI, b, h,
                          seqlen_q, seqlen_k, qk_scale, SCORE_MOD, SCORE_GRAD, SCORE_BOUNDED, SCORE_ARGS)
        pt = tl.math.exp2((st - m[None, :]) * qk_scale - log2_l[None, :])
        if LISTED and MASK_MOD is None:  # read outside the branch below, so that the pipeliner makes it asynchronous
            bits = _block_bits(SLOTS, mrow, BITS, entry, offs_m[None, :], offs_n[:, None], block_q, block_k, b, h,
                               seqlen_q, seqlen_k, MASK_MOD, MASK_ARGS)
        else:
            bits = None
        if WARP_SPEC:  # no branch in a warp-specialized loop: every tile masked (the identity on full tiles)
            pt = tl.where(_key_tile_mask(offs_m, offs_n, bits, SLOTS, mrow, BITS, entry, block_q, block_k, b, h,
                                         seqlen_q, seqlen_k, offset, left, right, HAS_LEFT, HAS_RIGHT, LISTED,
                                         MASK_MOD, MASK_ARGS), pt, 0.0)
        elif (pos < full_lo) | (pos >= full_hi):
            pt = tl.where(_key_tile_mask(offs_m, offs_n, bits, SLOTS, mrow, BITS, entry, block_q, block_k, b, h,
                                         seqlen_q, seqlen_k, offset, left, right, HAS_LEFT, HAS_RIGHT, LISTED,
                                         MASK_MOD, MASK_ARGS), pt, 0.0)
        if DROPOUT:  # out = (P * keep / (1 - p)) V: dV sees the dropped P, dP only its kept entries
            keep = _keep(seed, rng_offset, bh, offs_m[None, :], offs_n[:, None], threshold)
        if WITH_DV:
            pdt = pt
            if DROPOUT:
                pdt = tl.where(keep, pt * drop_scale, 0.0)
            dv += _dot(pdt.to(do.dtype), do, FP32_DOT)
        if WITH_DK:
            delta = tl.load(DELTA + g64 * stride_lh + offs_m, mask=q_ok, other=0.0)
            dpt = _dot(v, tl.trans(do), FP32_DOT)
            if DROPOUT:
                dpt = tl.where(keep, dpt * drop_scale, 0.0)
            dst = pt * (dpt - delta[None, :])
            if SOFTCAP or SCORE_GRAD is not None:
                dst = dst * dcap
            dk += _dot(dst.to(q.dtype), q, FP32_DOT)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_tile(start_n, bhk, Q, K, V, DO, STATS, DELTA, DK, DV, CU_Q, CU_K, SLOPES, RNG, MASK_TABLE,
                        MASK_SLOTS, MASK_BITS, SCORE_ARGS, MASK_ARGS, stride_qb, stride_qh, stride_qs, stride_qd,
                        stride_kb, stride_kh, stride_ks, stride_kd, stride_vb, stride_vh, stride_vs, stride_vd,
                        stride_dob, stride_doh, stride_dos, stride_dod, stride_dkb, stride_dkh, stride_dks,
                        stride_dkd, stride_dvb, stride_dvh, stride_dvs, stride_dvd, stride_lb, stride_lh, stride_ab,
                        stride_ah, n_heads, n_kv_heads, group, seqlen_q, seqlen_k, offset, left, right, scale,
                        qk_scale, cap_in, cap_out, threshold, drop_scale, stride_tb, stride_th, stride_tr, block_q,
                        block_k, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_LEFT: tl.constexpr,
                        HAS_RIGHT: tl.constexpr, FP32_DOT: tl.constexpr, TMA: tl.constexpr, WITH_DK: tl.constexpr,
                        WITH_DV: tl.constexpr, VARLEN: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                        DROPOUT: tl.constexpr, LISTED: tl.constexpr, SCORE_MOD: tl.constexpr,
                        SCORE_GRAD: tl.constexpr, SCORE_BOUNDED: tl.constexpr, MASK_MOD: tl.constexpr,
                        WARP_SPEC: tl.constexpr):
    """dK (if WITH_DK) and dV (if WITH_DV) of the key tile at rows start_n.. of kv head bhk = b * Hkv + hk: both in one
    program, or in two launches where the two accumulators together do not fit the registers
    (KernelConfig.split_dkdv)."""
    b = bhk // n_kv_heads
    hk = bhk % n_kv_heads
    q0, k0, seqlen_q, seqlen_k, offset = _sequence(CU_Q, CU_K, b, seqlen_q, seqlen_k, offset, VARLEN)
    if VARLEN:
        if start_n >= seqlen_k:
            return
    b64, hk64 = b.to(tl.int64), hk.to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    Kh = _at_rows(K, b64 * stride_kb + hk64 * stride_kh + k0 * stride_ks, seqlen_k, stride_ks, HEAD_DIM, BLOCK_N,
                  BLOCK_D, TMA)
    Vh = _at_rows(V, b64 * stride_vb + hk64 * stride_vh + k0 * stride_vs, seqlen_k, stride_vs, HEAD_DIM_V, BLOCK_N,
                  BLOCK_DV, TMA)
    k = _load_block(Kh, b, hk, start_n, stride_ks, stride_kd, seqlen_k, HEAD_DIM, BLOCK_N, BLOCK_D,
                    True, HEAD_DIM != BLOCK_D, TMA)
    v = k  # not read where WITH_DK is off: the dV pass needs no v
    if WITH_DK:
        v = _load_block(Vh, b, hk, start_n, stride_vs, stride_vd, seqlen_k, HEAD_DIM_V, BLOCK_N, BLOCK_DV,
                        True, HEAD_DIM_V != BLOCK_DV, TMA)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)

    if not LISTED:  # query tiles that see this key tile: the mask transposed (offset -> -offset, left <-> right)
        lo, full_lo, full_hi, hi = _block_range(start_n, seqlen_k, seqlen_q, -offset, right, left,
                                                BLOCK_N, BLOCK_M, HAS_RIGHT, HAS_LEFT)
    seed, rng_offset = _rng(RNG, DROPOUT)
    # The GQA group's query heads, summed here instead of with atomics: all in one loop (_attn_bwd_dkdv_inner), or a
    # loop per head where their ranges differ (a block mask's lists) or the loop reads through descriptors of one
    # head's rows (warp-specialized).
    loops = 1  # a constant: the one loop, with no loop around it
    per_loop = group
    if LISTED or WARP_SPEC:
        loops = group
        per_loop = 1
    for g in range(loops):
        h = hk * group + g
        h64 = h.to(tl.int64)
        mrow = b64 * 0
        if LISTED:  # this head's query blocks that see this key tile's block
            mrow = b64 * stride_tb + h64 * stride_th + (start_n // block_k) * stride_tr
            lo, full_lo, full_hi, hi = _listed_range(MASK_TABLE + mrow, block_q)
        Qh = _at_rows(Q, b64 * stride_qb + h64 * stride_qh + q0 * stride_qs, seqlen_q, stride_qs, HEAD_DIM, BLOCK_M,
                      BLOCK_D, TMA)
        DOh = _at_rows(DO, b64 * stride_dob + h64 * stride_doh + q0 * stride_dos, seqlen_q, stride_dos, HEAD_DIM_V,
                       BLOCK_M, BLOCK_DV, TMA)
        row = b64 * stride_lb + h64 * stride_lh + q0
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Qh, DOh, STATS + 2 * row, DELTA + row, b, h, per_loop,
                                      stride_qh, stride_qs, stride_qd, stride_doh, stride_dos, stride_dod, stride_lh,
                                      offs_n, lo, hi, full_lo, full_hi, seqlen_q, seqlen_k, offset, left, right,
                                      qk_scale, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_D, BLOCK_DV,
                                      HAS_LEFT, HAS_RIGHT, FP32_DOT, TMA, WITH_DK, WITH_DV,
                                      cap_in, cap_out, SLOPES, stride_ab, stride_ah, SOFTCAP, ALIBI, seed, rng_offset,
                                      n_heads, threshold, drop_scale, DROPOUT, MASK_TABLE, MASK_SLOTS, mrow, MASK_BITS,
                                      block_q, block_k, LISTED, SCORE_MOD, SCORE_GRAD, SCORE_BOUNDED, SCORE_ARGS,
                                      MASK_MOD, MASK_ARGS, WARP_SPEC)

    if WITH_DK:
        _store_tile(DK + b64 * stride_dkb + hk64 * stride_dkh + k0 * stride_dks, dk * scale, offs_n, offs_d,
                    stride_dks, stride_dkd, seqlen_k, HEAD_DIM, HEAD_DIM != BLOCK_D)
    if WITH_DV:
        _store_tile(DV + b64 * stride_dvb + hk64 * stride_dvh + k0 * stride_dvs, dv, offs_n, offs_dv,
                    stride_dvs, stride_dvd, seqlen_k, HEAD_DIM_V, HEAD_DIM_V != BLOCK_DV)


@features("HAS_LEFT", "HAS_RIGHT", "VARLEN", "SOFTCAP", "ALIBI", "DROPOUT", "LISTED")
@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, STATS, DELTA, DK, DV, CU_Q, CU_K, SLOPES, RNG, MASK_TABLE, MASK_SLOTS,
                          MASK_BITS, SCORE_ARGS, MASK_ARGS, stride_qb, stride_qh, stride_qs, stride_qd, stride_kb,
                          stride_kh, stride_ks, stride_kd, stride_vb, stride_vh, stride_vs, stride_vd, stride_dob,
                          stride_doh, stride_dos, stride_dod, stride_dkb, stride_dkh, stride_dks, stride_dkd,
                          stride_dvb, stride_dvh, stride_dvs, stride_dvd, stride_lb, stride_lh, stride_ab, stride_ah,
                          head_start, head_count, n_heads, n_kv_heads, group, seqlen_q, seqlen_k, offset, left, right,
                          scale, qk_scale, cap_in, cap_out, threshold, drop_scale, stride_tb, stride_th, stride_tr,
                          block_q, block_k, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                          HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, FP32_DOT: tl.constexpr, TMA: tl.constexpr,
                          REVERSE: tl.constexpr, WITH_DK: tl.constexpr, WITH_DV: tl.constexpr, VARLEN: tl.constexpr,
                          SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr, LISTED: tl.constexpr,
                          SCORE_MOD: tl.constexpr, SCORE_GRAD: tl.constexpr, SCORE_BOUNDED: tl.constexpr,
                          MASK_MOD: tl.constexpr, WARP_SPEC: tl.constexpr, PERSISTENT: tl.constexpr):
    """dK (if WITH_DK) and dV (if WITH_DV) of one key tile per program (grid: tiles x kv heads), or PERSISTENT: a
    program per SM walking the tiles (_walk_tile; dense calls only)."""
    if PERSISTENT:
        n_tiles = tl.cdiv(seqlen_k, BLOCK_N)
        for t in tl.range(tl.program_id(0), n_tiles * head_count, tl.num_programs(0)):
            start, bh = _walk_tile(t, n_tiles, head_count, head_start, BLOCK_N, REVERSE)
            _attn_bwd_dkdv_tile(start, bh, Q, K, V, DO, STATS, DELTA, DK, DV, CU_Q, CU_K, SLOPES, RNG, MASK_TABLE,
                                MASK_SLOTS, MASK_BITS, SCORE_ARGS, MASK_ARGS, stride_qb, stride_qh, stride_qs,
                                stride_qd, stride_kb, stride_kh, stride_ks, stride_kd, stride_vb, stride_vh, stride_vs,
                                stride_vd, stride_dob, stride_doh, stride_dos, stride_dod, stride_dkb, stride_dkh,
                                stride_dks, stride_dkd, stride_dvb, stride_dvh, stride_dvs, stride_dvd, stride_lb,
                                stride_lh, stride_ab, stride_ah, n_heads, n_kv_heads, group, seqlen_q, seqlen_k, offset,
                                left, right, scale, qk_scale, cap_in, cap_out, threshold, drop_scale, stride_tb,
                                stride_th, stride_tr, block_q, block_k, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, BLOCK_D,
                                BLOCK_DV, HAS_LEFT, HAS_RIGHT, FP32_DOT, TMA, WITH_DK, WITH_DV, VARLEN, SOFTCAP, ALIBI,
                                DROPOUT, LISTED, SCORE_MOD, SCORE_GRAD, SCORE_BOUNDED, MASK_MOD, WARP_SPEC)
    else:
        start, bh = _program_tile(head_start, BLOCK_N, REVERSE)
        _attn_bwd_dkdv_tile(start, bh, Q, K, V, DO, STATS, DELTA, DK, DV, CU_Q, CU_K, SLOPES, RNG, MASK_TABLE,
                            MASK_SLOTS, MASK_BITS, SCORE_ARGS, MASK_ARGS, stride_qb, stride_qh, stride_qs, stride_qd,
                            stride_kb, stride_kh, stride_ks, stride_kd, stride_vb, stride_vh, stride_vs, stride_vd,
                            stride_dob, stride_doh, stride_dos, stride_dod, stride_dkb, stride_dkh, stride_dks,
                            stride_dkd, stride_dvb, stride_dvh, stride_dvs, stride_dvd, stride_lb, stride_lh, stride_ab,
                            stride_ah, n_heads, n_kv_heads, group, seqlen_q, seqlen_k, offset, left, right, scale,
                            qk_scale, cap_in, cap_out, threshold, drop_scale, stride_tb, stride_th, stride_tr, block_q,
                            block_k, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, HAS_LEFT, HAS_RIGHT,
                            FP32_DOT, TMA, WITH_DK, WITH_DV, VARLEN, SOFTCAP, ALIBI, DROPOUT, LISTED, SCORE_MOD,
                            SCORE_GRAD, SCORE_BOUNDED, MASK_MOD, WARP_SPEC)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, m, log2_l, delta, K, V, b, hk, stride_kn, stride_kd, stride_vn, stride_vd,
                       offs_m, lo, hi, seqlen_q, seqlen_k, offset, left, right, qk_scale,
                       HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                       HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, MASKED: tl.constexpr,
                       FP32_DOT: tl.constexpr, TMA: tl.constexpr,
                       cap_in, cap_out, slope, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                       seed, rng_offset, bh, threshold, drop_scale, DROPOUT: tl.constexpr,
                       TABLE, SLOTS, mrow, BITS, block_q, block_k, LISTED: tl.constexpr,
                       h, SCORE_MOD: tl.constexpr, SCORE_GRAD: tl.constexpr, SCORE_BOUNDED: tl.constexpr, SCORE_ARGS,
                       MASK_MOD: tl.constexpr, MASK_ARGS, DBIAS, stride_dbs, BIAS_GRAD: tl.constexpr,
                       WARP_SPEC: tl.constexpr):
    """Key tiles [lo, hi) accumulated into one query tile's dQ (LISTED: positions in a block mask's list, as in
    the forward's inner loop). BIAS_GRAD: each tile's dS, the gradient of the modified scores (a bias's, before
    the sum over the dimensions it broadcasts over), is also written to DBIAS (rows stride_dbs apart). WARP_SPEC:
    the loop warp-specialized (as the forward's: one loop, every tile MASKED)."""
    for pos in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPEC):
        start_n, entry = _tile_at(pos, TABLE, mrow, block_k, LISTED)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_block(K, b, hk, start_n, stride_kn, stride_kd, seqlen_k, HEAD_DIM, BLOCK_N, BLOCK_D,
                        MASKED, HEAD_DIM != BLOCK_D, TMA)
        v = _load_block(V, b, hk, start_n, stride_vn, stride_vd, seqlen_k, HEAD_DIM_V, BLOCK_N, BLOCK_DV,
                        MASKED, HEAD_DIM_V != BLOCK_DV, TMA)
        s, dcap = _score(_dot(q, tl.trans(k), FP32_DOT), offs_m[:, None], offs_n[None, :], offset, cap_in, cap_out,
                         slope, SOFTCAP, ALIBI, b, h, seqlen_q, seqlen_k, qk_scale, SCORE_MOD, SCORE_GRAD,
                         SCORE_BOUNDED, SCORE_ARGS)
        p = tl.math.exp2((s - m[:, None]) * qk_scale - log2_l[:, None])
        if MASKED:
            ok = _visible(offs_m[:, None], offs_n[None, :], seqlen_q, seqlen_k, offset, left, right, HAS_LEFT,
                          HAS_RIGHT)
            if LISTED:
                ok = ok & _block_bits(SLOTS, mrow, BITS, entry, offs_m[:, None], offs_n[None, :], block_q,
                                      block_k, b, h, seqlen_q, seqlen_k, MASK_MOD, MASK_ARGS)
            p = tl.where(ok, p, 0.0)
        dp = _dot(do, tl.trans(v), FP32_DOT)
        if DROPOUT:
            dp = tl.where(_keep(seed, rng_offset, bh, offs_m[:, None], offs_n[None, :], threshold), dp * drop_scale,
                          0.0)
        ds = p * (dp - delta[:, None])
        if BIAS_GRAD:
            tl.store(DBIAS + offs_m[:, None] * stride_dbs + offs_n[None, :], ds,
                     mask=(offs_m[:, None] < seqlen_q) & (offs_n[None, :] < seqlen_k))
        if SOFTCAP or SCORE_GRAD is not None:
            ds = ds * dcap
        dq += _dot(ds.to(k.dtype), k, FP32_DOT)
    return dq


@triton.jit
def _attn_bwd_dq_tile(start_m, bh, Q, K, V, DO, STATS, DELTA, DQ, CU_Q, CU_K, SLOPES, RNG, MASK_TABLE, MASK_SLOTS,
                      MASK_BITS, SCORE_ARGS, MASK_ARGS, DBIAS, stride_qb, stride_qh, stride_qs, stride_qd, stride_kb,
                      stride_kh, stride_ks, stride_kd, stride_vb, stride_vh, stride_vs, stride_vd, stride_dob,
                      stride_doh, stride_dos, stride_dod, stride_dqb, stride_dqh, stride_dqs, stride_dqd, stride_lb,
                      stride_lh, stride_ab, stride_ah, n_heads, group, seqlen_q, seqlen_k, offset, left, right, scale,
                      qk_scale, cap_in, cap_out, threshold, drop_scale, stride_tb, stride_th, stride_tr, block_q,
                      block_k, stride_dbb, stride_dbh, stride_dbs, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                      HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, FP32_DOT: tl.constexpr, TMA: tl.constexpr,
                      VARLEN: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
                      LISTED: tl.constexpr, SCORE_MOD: tl.constexpr, SCORE_GRAD: tl.constexpr,
                      SCORE_BOUNDED: tl.constexpr, MASK_MOD: tl.constexpr, BIAS_GRAD: tl.constexpr,
                      WARP_SPEC: tl.constexpr):
    """dQ of the query tile at rows start_m.. of head bh = b * Hq + h."""
    b, h, hk = _query_head(bh, n_heads, group)
    q0, k0, seqlen_q, seqlen_k, offset = _sequence(CU_Q, CU_K, b, seqlen_q, seqlen_k, offset, VARLEN)
    if VARLEN:
        if start_m >= seqlen_q:
            return
    b64, h64, hk64 = b.to(tl.int64), h.to(tl.int64), hk.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seqlen_q
    q = _load_block(_at_rows(Q, b64 * stride_qb + h64 * stride_qh + q0 * stride_qs, seqlen_q, stride_qs, HEAD_DIM,
                             BLOCK_M, BLOCK_D, TMA), b, h, start_m, stride_qs,
                    stride_qd, seqlen_q, HEAD_DIM, BLOCK_M, BLOCK_D, True, HEAD_DIM != BLOCK_D, TMA)
    do = _load_block(_at_rows(DO, b64 * stride_dob + h64 * stride_doh + q0 * stride_dos, seqlen_q, stride_dos,
                              HEAD_DIM_V, BLOCK_M, BLOCK_DV, TMA), b, h, start_m,
                     stride_dos, stride_dod, seqlen_q, HEAD_DIM_V, BLOCK_M, BLOCK_DV, True, HEAD_DIM_V != BLOCK_DV, TMA)
    row = b64 * stride_lb + h64 * stride_lh + q0
    m = tl.load(STATS + 2 * (row + offs_m), mask=m_ok, other=0.0)
    log2_l = tl.load(STATS + 2 * (row + offs_m) + 1, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + row + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    Kh = _at_rows(K, b64 * stride_kb + hk64 * stride_kh + k0 * stride_ks, seqlen_k, stride_ks, HEAD_DIM, BLOCK_N,
                  BLOCK_D, TMA)
    Vh = _at_rows(V, b64 * stride_vb + hk64 * stride_vh + k0 * stride_vs, seqlen_k, stride_vs, HEAD_DIM_V, BLOCK_N,
                  BLOCK_DV, TMA)
    mrow, lo, full_lo, full_hi, hi = _key_walk(MASK_TABLE, b64, h64, start_m, stride_tb, stride_th, stride_tr,
                                               block_q, block_k, seqlen_q, seqlen_k, offset, left, right, BLOCK_M,
                                               BLOCK_N, HAS_LEFT, HAS_RIGHT, LISTED)
    slope = _slope(SLOPES, b, h, stride_ab, stride_ah, qk_scale, ALIBI)
    seed, rng_offset = _rng(RNG, DROPOUT)
    if BIAS_GRAD:
        DBIAS += b64 * stride_dbb + h64 * stride_dbh
    for seg in tl.static_range(1 if WARP_SPEC else 3):  # as the forward's segments
        seg_lo, seg_hi = _segment_range(seg, lo, full_lo, full_hi, hi, WARP_SPEC)
        dq = _attn_bwd_dq_inner(dq, q, do, m, log2_l, delta, Kh, Vh, b, hk, stride_ks, stride_kd, stride_vs,
                                stride_vd, offs_m, seg_lo, seg_hi, seqlen_q, seqlen_k, offset, left, right, qk_scale,
                                HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV,
                                HAS_LEFT, HAS_RIGHT, WARP_SPEC or seg != 1, FP32_DOT, TMA, cap_in, cap_out, slope,
                                SOFTCAP, ALIBI,
                                seed, rng_offset, bh, threshold, drop_scale, DROPOUT, MASK_TABLE, MASK_SLOTS, mrow,
                                MASK_BITS, block_q, block_k, LISTED, h, SCORE_MOD, SCORE_GRAD, SCORE_BOUNDED,
                                SCORE_ARGS, MASK_MOD, MASK_ARGS, DBIAS, stride_dbs, BIAS_GRAD, WARP_SPEC)

    _store_tile(DQ + b64 * stride_dqb + h64 * stride_dqh + q0 * stride_dqs, dq * scale, offs_m, offs_d,
                stride_dqs, stride_dqd, seqlen_q, HEAD_DIM, HEAD_DIM != BLOCK_D)


@features("HAS_LEFT", "HAS_RIGHT", "VARLEN", "SOFTCAP", "ALIBI", "DROPOUT", "LISTED", "BIAS_GRAD")
@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, STATS, DELTA, DQ, CU_Q, CU_K, SLOPES, RNG, MASK_TABLE, MASK_SLOTS, MASK_BITS,
                        SCORE_ARGS, MASK_ARGS, DBIAS, stride_qb, stride_qh, stride_qs, stride_qd, stride_kb,
                        stride_kh, stride_ks, stride_kd, stride_vb, stride_vh, stride_vs, stride_vd, stride_dob,
                        stride_doh, stride_dos, stride_dod, stride_dqb, stride_dqh, stride_dqs, stride_dqd, stride_lb,
                        stride_lh, stride_ab, stride_ah, head_start, head_count, n_heads, group, seqlen_q, seqlen_k,
                        offset, left, right, scale, qk_scale, cap_in, cap_out, threshold, drop_scale, stride_tb,
                        stride_th, stride_tr, block_q, block_k, stride_dbb, stride_dbh, stride_dbs,
                        HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_LEFT: tl.constexpr,
                        HAS_RIGHT: tl.constexpr, FP32_DOT: tl.constexpr, TMA: tl.constexpr, REVERSE: tl.constexpr,
                        VARLEN: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
                        LISTED: tl.constexpr, SCORE_MOD: tl.constexpr, SCORE_GRAD: tl.constexpr,
                        SCORE_BOUNDED: tl.constexpr, MASK_MOD: tl.constexpr, BIAS_GRAD: tl.constexpr,
                        WARP_SPEC: tl.constexpr, PERSISTENT: tl.constexpr):
    """dQ of one query tile per program (grid: tiles x heads), or PERSISTENT: a program per SM walking the tiles
    (_walk_tile; dense calls only)."""
    if PERSISTENT:
        n_tiles = tl.cdiv(seqlen_q, BLOCK_M)
        for t in tl.range(tl.program_id(0), n_tiles * head_count, tl.num_programs(0)):
            start, bh = _walk_tile(t, n_tiles, head_count, head_start, BLOCK_M, REVERSE)
            _attn_bwd_dq_tile(start, bh, Q, K, V, DO, STATS, DELTA, DQ, CU_Q, CU_K, SLOPES, RNG, MASK_TABLE, MASK_SLOTS,
                              MASK_BITS, SCORE_ARGS, MASK_ARGS, DBIAS, stride_qb, stride_qh, stride_qs, stride_qd,
                              stride_kb, stride_kh, stride_ks, stride_kd, stride_vb, stride_vh, stride_vs, stride_vd,
                              stride_dob, stride_doh, stride_dos, stride_dod, stride_dqb, stride_dqh, stride_dqs,
                              stride_dqd, stride_lb, stride_lh, stride_ab, stride_ah, n_heads, group, seqlen_q,
                              seqlen_k, offset, left, right, scale, qk_scale, cap_in, cap_out, threshold, drop_scale,
                              stride_tb, stride_th, stride_tr, block_q, block_k, stride_dbb, stride_dbh, stride_dbs,
                              HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, HAS_LEFT, HAS_RIGHT, FP32_DOT,
                              TMA, VARLEN, SOFTCAP, ALIBI, DROPOUT, LISTED, SCORE_MOD, SCORE_GRAD, SCORE_BOUNDED,
                              MASK_MOD, BIAS_GRAD, WARP_SPEC)
    else:
        start, bh = _program_tile(head_start, BLOCK_M, REVERSE)
        _attn_bwd_dq_tile(start, bh, Q, K, V, DO, STATS, DELTA, DQ, CU_Q, CU_K, SLOPES, RNG, MASK_TABLE, MASK_SLOTS,
                          MASK_BITS, SCORE_ARGS, MASK_ARGS, DBIAS, stride_qb, stride_qh, stride_qs, stride_qd,
                          stride_kb, stride_kh, stride_ks, stride_kd, stride_vb, stride_vh, stride_vs, stride_vd,
                          stride_dob, stride_doh, stride_dos, stride_dod, stride_dqb, stride_dqh, stride_dqs,
                          stride_dqd, stride_lb, stride_lh, stride_ab, stride_ah, n_heads, group, seqlen_q, seqlen_k,
                          offset, left, right, scale, qk_scale, cap_in, cap_out, threshold, drop_scale, stride_tb,
                          stride_th, stride_tr, block_q, block_k, stride_dbb, stride_dbh, stride_dbs, HEAD_DIM,
                          HEAD_DIM_V, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, HAS_LEFT, HAS_RIGHT, FP32_DOT, TMA, VARLEN,
                          SOFTCAP, ALIBI, DROPOUT, LISTED, SCORE_MOD, SCORE_GRAD, SCORE_BOUNDED, MASK_MOD, BIAS_GRAD,
                          WARP_SPEC)



def backward_launches(do, q, k, v, out, stats, dq, dk, dv, delta, scale: float, offset: int, left: int,
                      right: int, cfgs, packed=None, mods=None, blocks=None, dbias=None, dsink=None, dlse=None):
    """The backward's kernel launches (preprocess, dK/dV, dQ) as (kernel, grid, args, kwargs), for
    attention_backward and the compile-time gate. cfgs = (dK/dV config, dQ config); dbias: (B, Hq, Sq, Sk) float32
    (rows contiguous) that the dQ kernel fills with dS where the bias (mods.bias) needs a gradient; dsink: (B, Hq, Sq)
    float32 contiguous, each row's term of the sinks' gradient (with mods.sinks); dlse: (B, Hq, Sq) float32
    contiguous, the gradient of the lse, or None."""
    (B, Sq, Sk), cu, strides = grid_dims(q, k, packed)
    ptrs, slope_strides, values = modifier_args(mods, scale)
    fn_args, fns = function_args(mods, blocks)
    Hq, Hkv, D, Dv = q.shape[1], k.shape[1], q.shape[3], v.shape[3]
    bd, bdv, f32 = head_block(D), head_block(Dv), fp32_dot(q.dtype)
    c_kv, c_q = (block_tiles(c, blocks) for c in cfgs)
    # delta = rowsum(dO * O) needs no sequence bounds: over every row of the (B, Hq, S) slices, packed or not.
    sinks = None if mods is None or dsink is None else mods.sinks  # the sinks' gradient terms, where asked for
    launch_list = [(_attn_bwd_preprocess_kernel, (cdiv(q.shape[2], c_q.block_m), count),
                    (out, do, delta, stats, sinks, dsink, dlse, *out.stride(), *do.stride(), start, Hq, q.shape[2],
                     scale * LOG2E),
                    dict(HEAD_DIM_V=Dv, BLOCK_M=c_q.block_m, BLOCK_DV=bdv))
                   for start, count in head_chunks(q.shape[0] * Hq)]
    shape = dict(HEAD_DIM=D, HEAD_DIM_V=Dv, BLOCK_D=bd, BLOCK_DV=bdv, FP32_DOT=f32, **fns)
    rows = strides(delta)[:2]

    # Key tiles: the mask transposed.
    t_ptrs, t_values = block_args(blocks, transposed=True)
    src, kwargs = tile_args(c_kv, reverse_tiles(right, left), q, k, v, do, packed is not None)
    kwargs.update(shape)
    passes = [dict(WITH_DK=False, WITH_DV=True), dict(WITH_DK=True, WITH_DV=False)] if c_kv.split_dkdv else [
        dict(WITH_DK=True, WITH_DV=True)]
    launch_list += [(_attn_bwd_dkdv_kernel, tile_grid(kwargs, cdiv(Sk, c_kv.block_n), count, q.device),
                     (*src, stats, delta, dk, dv, *cu, *ptrs, *t_ptrs, *fn_args,
                      *strides(q), *strides(k), *strides(v), *strides(do), *strides(dk), *strides(dv), *rows,
                      *slope_strides, start, count, Hq, Hkv, Hq // Hkv, Sq, Sk, offset, left, right, scale,
                      scale * LOG2E, *values, *t_values),
                     dict(kwargs, **which))
                    for which in passes for start, count in head_chunks(B * Hkv) if Sk > 0]

    mask_ptrs, mask_values = block_args(blocks)
    src, kwargs = tile_args(c_q, reverse_tiles(left, right), q, k, v, do, packed is not None)
    kwargs.update(shape)
    launch_list += [(_attn_bwd_dq_kernel, tile_grid(kwargs, cdiv(Sq, c_q.block_m), count, q.device),
                     (*src, stats, delta, dq, *cu, *ptrs, *mask_ptrs, *fn_args, dbias,
                      *strides(q), *strides(k), *strides(v), *strides(do), *strides(dq), *rows, *slope_strides,
                      start, count, Hq, Hq // Hkv, Sq, Sk, offset, left, right, scale, scale * LOG2E, *values,
                      *mask_values, *(dbias.stride()[:3] if dbias is not None else (0, 0, 0))), kwargs)
                    for start, count in head_chunks(B * Hq) if Sq > 0]
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
