"""Forward kernel: one program per (query tile, batch * query head), online softmax over the visible key tiles."""
import torch
import triton
import triton.language as tl

from .common import (_at_rows, _block_bits, _clamp, _dot, _join_sink, _keep, _key_walk, _load_block, _load_kv, _p_for,
                     _program_tile, _merge_partial, _merge_stats, _partial, _query_head, _rng, _score, _segment_range,
                     _sequence, _sink, _slope, _split_count, _split_range, _store_tile, _tile_at, _tile_pages, _visible, _walk_tile)
from .configs import capability, cdiv, forward_config, head_block, head_chunks, invariant_config
from .launch import (LOG2E, block_args, block_tiles, dropout_threshold, features, fp8_args, fp32_dot, function_args,
                     grid_dims, modifier_args, reverse_tiles, run, tile_args, tile_grid)


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, K, V, b, hk, stride_kn, stride_kd, stride_vn, stride_vd,
                    offs_m, lo, hi, seqlen_q, seqlen_k, offset, left, right, qk_scale,
                    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, MASKED: tl.constexpr,
                    FP32_DOT: tl.constexpr, TMA: tl.constexpr,
                    PAGES, page_size, stride_kp, stride_vp, PAGED: tl.constexpr,
                    cap_in, cap_out, slope, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                    seed, rng_offset, bh, threshold, DROPOUT: tl.constexpr,
                    TABLE, SLOTS, mrow, BITS, block_q, block_k, LISTED: tl.constexpr,
                    h, SCORE_MOD: tl.constexpr, SCORE_GRAD: tl.constexpr, SCORE_BOUNDED: tl.constexpr, SCORE_ARGS,
                    MASK_MOD: tl.constexpr, MASK_ARGS, k_descale, DESCALE: tl.constexpr, WARP_SPEC: tl.constexpr):
    """Key tiles [lo, hi); MASKED tiles apply the mask and the key-length bound, the others need neither. PAGED: K and V
    are read through the block table PAGES (fused_attn/kernels/decode.py). K and V tiles of another dtype than q (an FP8 cache)
    are converted to q's in registers; DESCALE multiplies the scores by k_descale (the caller multiplies the output
    by v's); with FP8 q, k, v the dots run in FP8, P rounded to FP8 for P.V (_p_for). SOFTCAP / ALIBI / SCORE_MOD
    modify the scores (_score; slope: a scalar or one per row, (BLOCK_M, 1)); DROPOUT zeroes the dropped
    probabilities in what multiplies V, after they are summed into l (the caller rescales the output by 1 / (1 -
    p)). LISTED: [lo, hi) are positions in a block mask's list TABLE (common._tile_at), whose partial blocks' bits
    (or MASK_MOD) join the mask. A score function may hide pairs (-inf) in any tile, so with one every tile guards
    its empty rows. WARP_SPEC: the loop warp-specialized (a producer warp group issuing the loads, consumer groups
    computing; Hopper needs one branch-free loop: the caller runs every tile MASKED)."""
    page = _tile_pages(PAGES, lo, page_size, seqlen_k, BLOCK_N, PAGED)  # then each tile's next: see _load_kv
    for pos in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPEC):
        start_n, entry = _tile_at(pos, TABLE, mrow, block_k, LISTED)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_kv(K, page, b, hk, start_n, stride_kn, stride_kd, stride_kp, page_size, seqlen_k, HEAD_DIM,
                     BLOCK_N, BLOCK_D, MASKED, HEAD_DIM != BLOCK_D, TMA, PAGED).to(q.dtype)
        s = _dot(q, tl.trans(k), FP32_DOT)  # raw scores: the scale is applied after subtracting the max
        if DESCALE:
            s = s * k_descale
        if SOFTCAP or ALIBI or SCORE_MOD is not None:
            s, _ = _score(s, offs_m[:, None], offs_n[None, :], offset, cap_in, cap_out, slope, SOFTCAP, ALIBI, b, h,
                          seqlen_q, seqlen_k, qk_scale, SCORE_MOD, SCORE_GRAD, SCORE_BOUNDED, SCORE_ARGS)
        if MASKED:
            ok = _visible(offs_m[:, None], offs_n[None, :], seqlen_q, seqlen_k, offset, left, right, HAS_LEFT,
                          HAS_RIGHT)
            if LISTED:
                ok = ok & _block_bits(SLOTS, mrow, BITS, entry, offs_m[:, None], offs_n[None, :], block_q,
                                      block_k, b, h, seqlen_q, seqlen_k, MASK_MOD, MASK_ARGS)
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = m_new
        if MASKED or SCORE_MOD is not None:  # a row may have seen nothing yet: subtract 0, not -inf (exp2 gives 0)
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2((s - m_sub[:, None]) * qk_scale)
        alpha = tl.math.exp2((m_i - m_sub) * qk_scale)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_keep(seed, rng_offset, bh, offs_m[:, None], offs_n[None, :], threshold), p, 0.0)
        v = _load_kv(V, page, b, hk, start_n, stride_vn, stride_vd, stride_vp, page_size, seqlen_k, HEAD_DIM_V,
                     BLOCK_N, BLOCK_DV, MASKED, HEAD_DIM_V != BLOCK_DV, TMA, PAGED).to(q.dtype)
        page = _tile_pages(PAGES, pos + BLOCK_N, page_size, seqlen_k, BLOCK_N, PAGED)
        acc = acc * alpha[:, None] + _dot(_p_for(p, v, FP32_DOT), v, FP32_DOT)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_tile(start_m, bh, Q, K, V, O, LSE, STATS, CU_Q, CU_K, SLOPES, RNG, MASK_TABLE, MASK_SLOTS, MASK_BITS,
                   SINKS, Q_DESCALE, K_DESCALE, V_DESCALE, SCORE_ARGS, MASK_ARGS, stride_qb, stride_qh, stride_qs,
                   stride_qd, stride_kb, stride_kh, stride_ks, stride_kd, stride_vb, stride_vh, stride_vs, stride_vd,
                   stride_ob, stride_oh, stride_os, stride_od, stride_lb, stride_lh, stride_ab, stride_ah, stride_db,
                   stride_dh, n_heads, group, seqlen_q, seqlen_k, offset, left, right, qk_scale, cap_in, cap_out,
                   threshold, drop_scale, stride_tb, stride_th, stride_tr, block_q, block_k, split_keys,
                   HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                   FP32_DOT: tl.constexpr, TMA: tl.constexpr, VARLEN: tl.constexpr, SOFTCAP: tl.constexpr,
                   ALIBI: tl.constexpr, DROPOUT: tl.constexpr, LISTED: tl.constexpr, SCORE_MOD: tl.constexpr,
                   SCORE_GRAD: tl.constexpr, SCORE_BOUNDED: tl.constexpr, MASK_MOD: tl.constexpr,
                   HAS_SINKS: tl.constexpr, FP8: tl.constexpr, WARP_SPEC: tl.constexpr, INVARIANT: tl.constexpr):
    """The forward of one query tile (rows start_m..) of head bh = b * Hq + h."""
    b, h, hk = _query_head(bh, n_heads, group)
    q0, k0, seqlen_q, seqlen_k, offset = _sequence(CU_Q, CU_K, b, seqlen_q, seqlen_k, offset, VARLEN)
    if VARLEN:
        if start_m >= seqlen_q:  # the grid covers the longest sequence
            return
    b64, h64, hk64 = b.to(tl.int64), h.to(tl.int64), hk.to(tl.int64)
    Q = _at_rows(Q, b64 * stride_qb + h64 * stride_qh + q0 * stride_qs, seqlen_q, stride_qs, HEAD_DIM, BLOCK_M,
                 BLOCK_D, TMA)
    K = _at_rows(K, b64 * stride_kb + hk64 * stride_kh + k0 * stride_ks, seqlen_k, stride_ks, HEAD_DIM, BLOCK_N,
                 BLOCK_D, TMA)
    V = _at_rows(V, b64 * stride_vb + hk64 * stride_vh + k0 * stride_vs, seqlen_k, stride_vs, HEAD_DIM_V, BLOCK_N,
                 BLOCK_DV, TMA)
    O += b64 * stride_ob + h64 * stride_oh + q0 * stride_os
    row = b64 * stride_lb + h64 * stride_lh + q0  # lse, stats: one float (two) per query row
    LSE += row
    STATS += row * 2

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_block(Q, b, h, start_m, stride_qs, stride_qd, seqlen_q, HEAD_DIM, BLOCK_M, BLOCK_D,
                    True, HEAD_DIM != BLOCK_D, TMA)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    slope = _slope(SLOPES, b, h, stride_ab, stride_ah, qk_scale, ALIBI)
    seed, rng_offset = _rng(RNG, DROPOUT)
    qk_descale = tl.full([], 1.0, tl.float32)
    v_descale = qk_descale
    if FP8:  # FP8 q, k, v: the scores' and the output's dequantization factors of (b, kv head)
        d = b64 * stride_db + hk64 * stride_dh
        qk_descale = tl.load(Q_DESCALE + d) * tl.load(K_DESCALE + d)
        v_descale = tl.load(V_DESCALE + d)
    mrow, lo, full_lo, full_hi, hi = _key_walk(MASK_TABLE, b64, h64, start_m, stride_tb, stride_th, stride_tr,
                                               block_q, block_k, seqlen_q, seqlen_k, offset, left, right, BLOCK_M,
                                               BLOCK_N, HAS_LEFT, HAS_RIGHT, LISTED)
    # Same inner loop three times: masked leading edge, unmasked middle, masked trailing edge (list walk: masked
    # partial blocks, unmasked full blocks, nothing). Warp-specialized: once, every tile masked (the mask is the
    # identity on full tiles, so the result is the same to the bit). INVARIANT (the batch-invariant mode): the walk
    # cut into splits of split_keys keys at absolute positions, each split's softmax from a fresh state, merged in
    # key order as the split-KV kernels merge theirs (_merge_partial); else one split, the whole walk.
    n_splits = 1
    s_lo, s_hi = lo, hi  # this split's keys
    o_all, lse_all, m_all, l_all = acc, m_i, m_i, l_i  # the splits merged so far: output, lse, stats
    if INVARIANT:
        n_splits = _split_count(lo, hi, split_keys)
    for split in range(n_splits):
        if INVARIANT:
            s_lo, s_hi = _split_range(split, lo, hi, split_keys)
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        for seg in tl.static_range(1 if WARP_SPEC else 3):
            seg_lo, seg_hi = _segment_range(seg, lo, full_lo, full_hi, hi, WARP_SPEC)
            if INVARIANT:
                seg_lo, seg_hi = _clamp(seg_lo, s_lo, s_hi), _clamp(seg_hi, s_lo, s_hi)
            acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, b, hk, stride_ks, stride_kd, stride_vs, stride_vd,
                                            offs_m, seg_lo, seg_hi, seqlen_q, seqlen_k, offset, left, right,
                                            qk_scale, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV,
                                            HAS_LEFT, HAS_RIGHT, WARP_SPEC or seg != 1, FP32_DOT, TMA, None, 0, 0, 0,
                                            False,
                                            cap_in, cap_out, slope, SOFTCAP, ALIBI, seed, rng_offset, bh, threshold,
                                            DROPOUT, MASK_TABLE, MASK_SLOTS, mrow, MASK_BITS, block_q, block_k,
                                            LISTED, h, SCORE_MOD, SCORE_GRAD, SCORE_BOUNDED, SCORE_ARGS, MASK_MOD,
                                            MASK_ARGS, qk_descale, FP8, WARP_SPEC)
        if INVARIANT:
            if FP8:
                acc = acc * v_descale
            o_s, lse_s = _partial(acc, l_i, m_i, qk_scale)
            o_all, lse_all = _merge_partial(o_all, lse_all, o_s, lse_s)
            m_all, l_all = _merge_stats(m_all, l_all, m_i, l_i, qk_scale)
    if INVARIANT:  # the sinks join as a split of output 0 (as in the split-KV kernels); the stats for the backward
        if HAS_SINKS:
            o_all, lse_all = _merge_partial(o_all, lse_all, 0.0, _sink(SINKS, h, 1.4426950408889634, HAS_SINKS))
            m_all, l_all = _merge_stats(m_all, l_all, _sink(SINKS, h, qk_scale, HAS_SINKS), 1.0, qk_scale)
        acc, l_i, m_i = o_all, l_all, m_all
    else:
        if FP8:
            acc = acc * v_descale
        if HAS_SINKS:  # the sink's term joins the denominator (and the stats), not the output
            acc, l_i, m_i = _join_sink(acc, l_i, m_i, _sink(SINKS, h, qk_scale, HAS_SINKS), qk_scale)

    # Rows that saw no key (and no sink): out 0, lse -inf; their stats make the backward's P exactly 0.
    empty = l_i == 0.0
    l_i = tl.where(empty, 1.0, l_i)
    out = acc  # the mode's merged output, already normalized
    if not INVARIANT:
        out = acc / l_i[:, None]
    if DROPOUT:
        out = out * drop_scale
    m_i = tl.where(empty, 0.0, m_i)
    log2_l = tl.where(empty, float("inf"), tl.math.log2(l_i))
    lse = (m_i * qk_scale + log2_l) * 0.6931471805599453
    if INVARIANT:  # the merged lse, as the split-KV kernels compute it
        lse = lse_all
    tl.store(STATS + offs_m * 2, m_i, mask=offs_m < seqlen_q)
    tl.store(STATS + offs_m * 2 + 1, log2_l, mask=offs_m < seqlen_q)
    _store_tile(O, out, offs_m, offs_dv, stride_os, stride_od, seqlen_q, HEAD_DIM_V, HEAD_DIM_V != BLOCK_DV)
    tl.store(LSE + offs_m, tl.where(empty, float("-inf"), lse), mask=offs_m < seqlen_q)


@features("HAS_LEFT", "HAS_RIGHT", "VARLEN", "SOFTCAP", "ALIBI", "DROPOUT", "LISTED", "HAS_SINKS", "FP8",
          "INVARIANT")
@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, STATS, CU_Q, CU_K, SLOPES, RNG, MASK_TABLE, MASK_SLOTS, MASK_BITS, SINKS,
                     Q_DESCALE, K_DESCALE, V_DESCALE, SCORE_ARGS, MASK_ARGS, stride_qb, stride_qh, stride_qs,
                     stride_qd, stride_kb, stride_kh, stride_ks, stride_kd, stride_vb, stride_vh, stride_vs,
                     stride_vd, stride_ob, stride_oh, stride_os, stride_od, stride_lb, stride_lh, stride_ab,
                     stride_ah, stride_db, stride_dh, head_start, head_count, n_heads, group, seqlen_q, seqlen_k,
                     offset, left, right, qk_scale, cap_in, cap_out, threshold, drop_scale, stride_tb, stride_th,
                     stride_tr, block_q, block_k, split_keys, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                     HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, FP32_DOT: tl.constexpr, TMA: tl.constexpr,
                     REVERSE: tl.constexpr, VARLEN: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                     DROPOUT: tl.constexpr, LISTED: tl.constexpr, SCORE_MOD: tl.constexpr, SCORE_GRAD: tl.constexpr,
                     SCORE_BOUNDED: tl.constexpr, MASK_MOD: tl.constexpr, HAS_SINKS: tl.constexpr, FP8: tl.constexpr,
                     WARP_SPEC: tl.constexpr, PERSISTENT: tl.constexpr, INVARIANT: tl.constexpr):
    """One query tile per program (grid: tiles x heads), or PERSISTENT: a program per SM walking the tiles of
    head_count heads from head_start heaviest first (_walk_tile; dense calls only). WARP_SPEC: the key loop
    warp-specialized, over descriptors made in the kernel (TMA == 2, common._at_rows)."""
    if PERSISTENT:
        n_tiles = tl.cdiv(seqlen_q, BLOCK_M)
        for t in tl.range(tl.program_id(0), n_tiles * head_count, tl.num_programs(0)):
            start_m, bh = _walk_tile(t, n_tiles, head_count, head_start, BLOCK_M, REVERSE)
            _attn_fwd_tile(start_m, bh, Q, K, V, O, LSE, STATS, CU_Q, CU_K, SLOPES, RNG, MASK_TABLE, MASK_SLOTS,
                           MASK_BITS, SINKS, Q_DESCALE, K_DESCALE, V_DESCALE, SCORE_ARGS, MASK_ARGS, stride_qb,
                           stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd, stride_vb,
                           stride_vh, stride_vs, stride_vd, stride_ob, stride_oh, stride_os, stride_od, stride_lb,
                           stride_lh, stride_ab, stride_ah, stride_db, stride_dh, n_heads, group, seqlen_q, seqlen_k,
                           offset, left, right, qk_scale, cap_in, cap_out, threshold, drop_scale, stride_tb, stride_th,
                           stride_tr, block_q, block_k, split_keys, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, BLOCK_D,
                           BLOCK_DV, HAS_LEFT, HAS_RIGHT, FP32_DOT, TMA, VARLEN, SOFTCAP, ALIBI, DROPOUT, LISTED,
                           SCORE_MOD, SCORE_GRAD, SCORE_BOUNDED, MASK_MOD, HAS_SINKS, FP8, WARP_SPEC, INVARIANT)
    else:
        start_m, bh = _program_tile(head_start, BLOCK_M, REVERSE)
        _attn_fwd_tile(start_m, bh, Q, K, V, O, LSE, STATS, CU_Q, CU_K, SLOPES, RNG, MASK_TABLE, MASK_SLOTS, MASK_BITS,
                       SINKS, Q_DESCALE, K_DESCALE, V_DESCALE, SCORE_ARGS, MASK_ARGS, stride_qb, stride_qh, stride_qs,
                       stride_qd, stride_kb, stride_kh, stride_ks, stride_kd, stride_vb, stride_vh, stride_vs,
                       stride_vd, stride_ob, stride_oh, stride_os, stride_od, stride_lb, stride_lh, stride_ab,
                       stride_ah, stride_db, stride_dh, n_heads, group, seqlen_q, seqlen_k, offset, left, right,
                       qk_scale, cap_in, cap_out, threshold, drop_scale, stride_tb, stride_th, stride_tr, block_q,
                       block_k, split_keys, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, HAS_LEFT,
                       HAS_RIGHT, FP32_DOT, TMA, VARLEN, SOFTCAP, ALIBI, DROPOUT, LISTED, SCORE_MOD, SCORE_GRAD,
                       SCORE_BOUNDED, MASK_MOD, HAS_SINKS, FP8, WARP_SPEC, INVARIANT)


def forward_launches(q, k, v, out, lse, stats, scale: float, offset: int, left: int, right: int, cfg, packed=None,
                     mods=None, blocks=None, split_keys: int = 0):
    """The forward's kernel launches, as (kernel, grid, args, kwargs): attention_forward runs them, the
    compile-time gate (tests/aot_compile.py) compiles exactly them for a target without a GPU. split_keys > 0: the
    batch-invariant mode's splits (a block mask's walk is not split: only this kernel walks one)."""
    (B, Sq, Sk), cu, strides = grid_dims(q, k, packed)
    ptrs, slope_strides, values = modifier_args(mods, scale)
    mask_ptrs, mask_values = block_args(blocks)
    fn_args, fns = function_args(mods, blocks)
    cfg = block_tiles(cfg, blocks)
    Hq, Hkv, D, Dv = q.shape[1], k.shape[1], q.shape[3], v.shape[3]
    src, kwargs = tile_args(cfg, reverse_tiles(left, right), q, k, v, packed=packed is not None)
    kwargs.update(HEAD_DIM=D, HEAD_DIM_V=Dv, BLOCK_D=head_block(D), BLOCK_DV=head_block(Dv),
                  FP32_DOT=fp32_dot(q.dtype), **fns)
    descales, descale_strides = fp8_args(mods)
    return [(_attn_fwd_kernel, tile_grid(kwargs, cdiv(Sq, cfg.block_m), count, q.device),
             (*src, out, lse, stats, *cu, *ptrs, *mask_ptrs, None if mods is None else mods.sinks, *descales,
              *fn_args, *strides(q), *strides(k), *strides(v), *strides(out), *strides(lse)[:2], *slope_strides,
              *descale_strides, start, count, Hq,
              Hq // Hkv, Sq, Sk, offset, left, right, scale * LOG2E, *values, *mask_values,
              0 if blocks is not None else split_keys), kwargs)
            for start, count in head_chunks(B * Hq) if Sq > 0]


def attention_forward(q, k, v, out, lse, stats, scale: float, offset: int, left: int, right: int, config=None,
                      packed=None, mods=None, blocks=None, split_keys: int = 0):
    """Launch the forward on (B, H, S, D)-indexed views (any strides). Writes out (B, Hq, Sq, Dv),
    lse (B, Hq, Sq, float32, natural log, contiguous) and, for the backward, stats (B, Hq, Sq, 2, float32,
    contiguous). Packed sequences (`packed`, a Packed): B = 1, S = total rows, and the mask and offset are each
    sequence's own; rows no sequence covers are not written. stats holds the row max m of the unscaled scores
    and log2 l of the softmax denominator. Keeping the two apart lets the
    backward form P = exp2((S - m) * scale * log2(e) - log2 l) without the cancellation of two large numbers
    that S - lse suffers at large logits. `config` (a KernelConfig) overrides configs.py, for tuning and tests;
    its TMA path is taken where the inputs qualify (tma_ok), else the pointer path. `mods` (a Modifiers): softcap,
    ALiBi, dropout. `blocks` (a BlockTables): a block mask, walked instead of the band (tiles no larger than its
    blocks). split_keys > 0: the batch-invariant mode (fused_attn/batch_invariant.py): its tiles
    (configs.invariant_config) and splits of split_keys keys, merged in key order."""
    cc = capability(q.device)
    cfg = config or (invariant_config(q.shape[3], v.shape[3], q.dtype, cc, split_keys) if split_keys else
                     forward_config(q.shape[3], v.shape[3], q.dtype, cc, packed is not None))
    run(forward_launches(q, k, v, out, lse, stats, scale, offset, left, right, cfg, packed, mods, blocks,
                         split_keys), "fwd")
    return out, lse, stats


@triton.jit
def _dropout_mask_kernel(RNG, MASK, seqlen_q, seqlen_k, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One (query head b * H + h, row tile, column tile) of the keep-mask (B, H, Sq, Sk), as the attention kernels
    draw it (_keep)."""
    bh = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    seed, rng_offset = _rng(RNG, True)
    keep = _keep(seed, rng_offset, bh, offs_m[:, None], offs_n[None, :], threshold)
    ptrs = MASK + bh.to(tl.int64) * seqlen_q * seqlen_k + offs_m[:, None] * seqlen_k + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < seqlen_q) & (offs_n[None, :] < seqlen_k))


def dropout_keep_mask(rng, batch: int, heads: int, seqlen_q: int, seqlen_k: int, dropout_p: float):
    """The boolean keep-mask (B, H, Sq, Sk) that a dropout call with this rng ([seed, offset], int64) applies."""
    mask = torch.empty(batch, heads, seqlen_q, seqlen_k, device=rng.device, dtype=torch.int8)
    if mask.numel():
        _dropout_mask_kernel[(batch * heads, cdiv(seqlen_q, 32), cdiv(seqlen_k, 32))](
            rng, mask, seqlen_q, seqlen_k, dropout_threshold(dropout_p), BLOCK_M=32, BLOCK_N=32)
    return mask.view(torch.bool)
