"""Forward kernel: one program per (query tile, batch * query head), online softmax over the visible key tiles."""
import torch
import triton
import triton.language as tl

from .common import (_at_rows, _clamp, _dot, _join_sink, _keep, _key_walk, _load_block, _load_kv, _merge_partial,
                     _merge_stats, _p_for, _partial, _query_head, _rng, _score, _segment_range, _sequence, _sink,
                     _slope, _split_count, _split_range, _step_tile, _store_tile, _tile_at, _tile_mask, _tile_pages,
                     _tiles)
from .configs import capability, cdiv, forward_config, head_chunks, invariant_config
from .launch import (LOG2E, SeqArgs, Sched, block_args, block_tiles, dropout_threshold, flags, function_args,
                     grid_dims, modifier_args, reverse_tiles, run, tile_args, tile_grid)


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, K, V, kv, offs_m, lo, hi, seq, qk_scale, mods, rows, blocks, mrow,
                    C: tl.constexpr, F: tl.constexpr, MASKED: tl.constexpr):
    """Key tiles [lo, hi); MASKED tiles apply the mask and the key-length bound, the others need neither.
    kv = (b, kv head, K's (row, col) strides, V's, pages): pages = (the block table PAGES, K's and V's page strides)
    where F.PAGED (fused_attn/kernels/decode.py), else None. seq = (seqlen_q, seqlen_k, offset, left, right).
    rows = (query head h -- one per row where the split-KV kernel packs heads --, b * Hq + h, the ALiBi slope: a
    scalar or one per row, (BLOCK_M, 1) --, dropout's seed and offset, k_descale). K and V tiles of another dtype
    than q (an FP8 cache) are converted to q's in registers; F.FP8 / F.FP8_KV multiply the scores by k_descale (the
    caller multiplies the output by v's); with FP8 q, k, v the dots run in FP8, P rounded to FP8 for P.V (_p_for).
    Softcap / ALiBi / a score function modify the scores (_score from `mods`, a ModArgs); dropout zeroes the dropped
    probabilities in what multiplies V, after they are summed into l (the caller rescales the output by 1 / (1 -
    p)). F.LISTED: [lo, hi) are positions in a block mask's list (`blocks`, a MaskArgs, at mrow; common._tile_at),
    whose partial blocks' bits (or F.MASK_MOD) join the mask. A score function may hide pairs (-inf) in any tile,
    so with one every tile guards its empty rows. C.WARP_SPEC: the loop warp-specialized (a producer warp group
    issuing the loads, consumer groups computing; Hopper needs one branch-free loop: the caller runs every tile
    MASKED)."""
    b, hk, sk, sv, pages = kv
    seqlen_q, seqlen_k, offset, left, right = seq
    h, bh, slope, seed, rng_offset, k_descale = rows
    PAGE_SIZE: tl.constexpr = C.PAGE_SIZE
    page = _tile_pages(pages, lo, PAGE_SIZE, seqlen_k, C.BLOCK_N, F.PAGED)  # then each tile's next: see _load_kv
    for pos in tl.range(lo, hi, C.BLOCK_N, warp_specialize=C.WARP_SPEC):
        start_n, entry = _tile_at(pos, blocks, mrow, True, F.LISTED)
        offs_n = start_n + tl.arange(0, C.BLOCK_N)
        k = _load_kv(K, page, pages, 1, b, hk, start_n, sk, PAGE_SIZE, seqlen_k, C.HEAD_DIM, C.BLOCK_N, C.BLOCK_D,
                     MASKED, C.TMA, F.PAGED).to(q.dtype)
        s = _dot(q, tl.trans(k), C.FP32_DOT)  # raw scores: the scale is applied after subtracting the max
        if F.FP8 or F.FP8_KV:
            s = s * k_descale
        if F.SOFTCAP or F.ALIBI or F.SCORE_MOD is not None:
            s, _ = _score(s, offs_m[:, None], offs_n[None, :], offset, slope, b, h, seqlen_q, seqlen_k, qk_scale,
                          mods, F)
        if MASKED:
            s = tl.where(_tile_mask(offs_m[:, None], offs_n[None, :], seq, blocks, mrow, entry, b, h, F), s,
                         float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = m_new
        if MASKED or F.SCORE_MOD is not None:  # a row may have seen nothing yet: subtract 0, not -inf (exp2 gives 0)
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2((s - m_sub[:, None]) * qk_scale)
        alpha = tl.math.exp2((m_i - m_sub) * qk_scale)
        l_i = l_i * alpha + tl.sum(p, 1)
        if F.DROPOUT:
            p = tl.where(_keep(seed, rng_offset, bh, offs_m[:, None], offs_n[None, :], mods.threshold), p, 0.0)
        v = _load_kv(V, page, pages, 2, b, hk, start_n, sv, PAGE_SIZE, seqlen_k, C.HEAD_DIM_V, C.BLOCK_N,
                     C.BLOCK_DV, MASKED, C.TMA, F.PAGED).to(q.dtype)
        page = _tile_pages(pages, pos + C.BLOCK_N, PAGE_SIZE, seqlen_k, C.BLOCK_N, F.PAGED)
        acc = acc * alpha[:, None] + _dot(_p_for(p, v, C.FP32_DOT), v, C.FP32_DOT)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_tile(start_m, bh, Q, K, V, O, LSE, STATS, strides, seqs, sched, mods, blocks, qk_scale,
                   C: tl.constexpr, F: tl.constexpr):
    """The forward of one query tile (rows start_m..) of head bh = b * Hq + h."""
    (sq, sk, sv, so, sl) = strides
    b, h, hk = _query_head(bh, sched.n_heads, sched.group)
    q0, k0, seqlen_q, seqlen_k, offset = _sequence(seqs.CU_Q, seqs.CU_K, b, seqs.seqlen_q, seqs.seqlen_k,
                                                   seqs.offset, F.VARLEN)
    if F.VARLEN:
        if start_m >= seqlen_q:  # the grid covers the longest sequence
            return
    BLOCK_M: tl.constexpr = C.BLOCK_M
    BLOCK_DV: tl.constexpr = C.BLOCK_DV
    b64, h64, hk64 = b.to(tl.int64), h.to(tl.int64), hk.to(tl.int64)
    Q = _at_rows(Q, b64 * sq[0] + h64 * sq[1] + q0 * sq[2], seqlen_q, sq[2], C.HEAD_DIM, BLOCK_M, C.BLOCK_D, C.TMA)
    K = _at_rows(K, b64 * sk[0] + hk64 * sk[1] + k0 * sk[2], seqlen_k, sk[2], C.HEAD_DIM, C.BLOCK_N, C.BLOCK_D,
                 C.TMA)
    V = _at_rows(V, b64 * sv[0] + hk64 * sv[1] + k0 * sv[2], seqlen_k, sv[2], C.HEAD_DIM_V, C.BLOCK_N, BLOCK_DV,
                 C.TMA)
    O += b64 * so[0] + h64 * so[1] + q0 * so[2]
    row = b64 * sl[0] + h64 * sl[1] + q0  # lse, stats: one float (two) per query row
    LSE += row
    STATS += row * 2

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_block(Q, b, h, start_m, sq[2], sq[3], seqlen_q, C.HEAD_DIM, BLOCK_M, C.BLOCK_D,
                    True, C.HEAD_DIM != C.BLOCK_D, C.TMA)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    slope = _slope(mods.SLOPES, b, h, mods.slope_strides[0], mods.slope_strides[1], qk_scale, F.ALIBI)
    seed, rng_offset = _rng(mods.RNG, F.DROPOUT)
    qk_descale = tl.full([], 1.0, tl.float32)
    v_descale = qk_descale
    if F.FP8:  # FP8 q, k, v: the scores' and the output's dequantization factors of (b, kv head)
        d = b64 * mods.descale_strides[0] + hk64 * mods.descale_strides[1]
        qk_descale = tl.load(mods.Q_DESCALE + d) * tl.load(mods.K_DESCALE + d)
        v_descale = tl.load(mods.V_DESCALE + d)
    left, right = seqs.left, seqs.right
    mrow, lo, full_lo, full_hi, hi = _key_walk(blocks, b64, h64, start_m, seqlen_q, seqlen_k, offset, left, right,
                                               C, F)
    kv = (b, hk, (sk[2], sk[3]), (sv[2], sv[3]), None)
    seq = (seqlen_q, seqlen_k, offset, left, right)
    rows = (h, bh, slope, seed, rng_offset, qk_descale)
    # Same inner loop three times: masked leading edge, unmasked middle, masked trailing edge (list walk: masked
    # partial blocks, unmasked full blocks, nothing). Warp-specialized: once, every tile masked (the mask is the
    # identity on full tiles, so the result is the same to the bit). INVARIANT (the batch-invariant mode): the walk
    # cut into splits of split_keys keys at absolute positions, each split's softmax from a fresh state, merged in
    # key order as the split-KV kernels merge theirs (_merge_partial); else one split, the whole walk.
    n_splits = 1
    s_lo, s_hi = lo, hi  # this split's keys
    o_all, lse_all, m_all, l_all = acc, m_i, m_i, l_i  # the splits merged so far: output, lse, stats
    if F.INVARIANT:
        n_splits = _split_count(lo, hi, sched.split_keys)
    for split in range(n_splits):
        if F.INVARIANT:
            s_lo, s_hi = _split_range(split, lo, hi, sched.split_keys)
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        for seg in tl.static_range(1 if C.WARP_SPEC else 3):
            seg_lo, seg_hi = _segment_range(seg, lo, full_lo, full_hi, hi, C.WARP_SPEC)
            if F.INVARIANT:
                seg_lo, seg_hi = _clamp(seg_lo, s_lo, s_hi), _clamp(seg_hi, s_lo, s_hi)
            acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, kv, offs_m, seg_lo, seg_hi, seq, qk_scale, mods,
                                            rows, blocks, mrow, C, F, C.WARP_SPEC or seg != 1)
        if F.INVARIANT:
            if F.FP8:
                acc = acc * v_descale
            o_s, lse_s = _partial(acc, l_i, m_i, qk_scale)
            o_all, lse_all = _merge_partial(o_all, lse_all, o_s, lse_s)
            m_all, l_all = _merge_stats(m_all, l_all, m_i, l_i, qk_scale)
    if F.INVARIANT:  # the sinks join as a split of output 0 (as in the split-KV kernels); the stats for the backward
        if F.HAS_SINKS:
            o_all, lse_all = _merge_partial(o_all, lse_all, 0.0, _sink(mods.SINKS, h, 1.4426950408889634, True))
            m_all, l_all = _merge_stats(m_all, l_all, _sink(mods.SINKS, h, qk_scale, True), 1.0, qk_scale)
        acc, l_i, m_i = o_all, l_all, m_all
    else:
        if F.FP8:
            acc = acc * v_descale
        if F.HAS_SINKS:  # the sink's term joins the denominator (and the stats), not the output
            acc, l_i, m_i = _join_sink(acc, l_i, m_i, _sink(mods.SINKS, h, qk_scale, True), qk_scale)

    # Rows that saw no key (and no sink): out 0, lse -inf; their stats make the backward's P exactly 0.
    empty = l_i == 0.0
    l_i = tl.where(empty, 1.0, l_i)
    out = acc  # the mode's merged output, already normalized
    if not F.INVARIANT:
        out = acc / l_i[:, None]
    if F.DROPOUT:
        out = out * mods.drop_scale
    m_i = tl.where(empty, 0.0, m_i)
    log2_l = tl.where(empty, float("inf"), tl.math.log2(l_i))
    lse = (m_i * qk_scale + log2_l) * 0.6931471805599453
    if F.INVARIANT:  # the merged lse, as the split-KV kernels compute it
        lse = lse_all
    tl.store(STATS + offs_m * 2, m_i, mask=offs_m < seqlen_q)
    tl.store(STATS + offs_m * 2 + 1, log2_l, mask=offs_m < seqlen_q)
    _store_tile(O, out, offs_m, offs_dv, so[2], so[3], seqlen_q, C.HEAD_DIM_V, C.HEAD_DIM_V != BLOCK_DV)
    tl.store(LSE + offs_m, tl.where(empty, float("-inf"), lse), mask=offs_m < seqlen_q)


FORWARD_FLAGS = ("HAS_LEFT", "HAS_RIGHT", "VARLEN", "SOFTCAP", "ALIBI", "DROPOUT", "LISTED", "HAS_SINKS", "FP8",
                 "INVARIANT")


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, STATS, strides, seqs, sched, mods, blocks, qk_scale, C: tl.constexpr,
                     F: tl.constexpr):
    """The forward's tiles: one per program (grid: tiles x heads), or C.PERSISTENT: a program per SM walking the
    tiles of sched.head_count heads from sched.head_start heaviest first (_walk_tile; dense calls only); one loop
    either way (_tiles). Q, K, V: (B, H, S, D)-indexed tensors or TMA descriptors (C.TMA); strides: each tensor's
    (batch, head, row, col) strides (q, k, v, out; lse's batch and head); seqs a SeqArgs, sched a Sched, mods a
    ModArgs, blocks a MaskArgs; qk_scale = scale * log2(e). C.WARP_SPEC: the key loop warp-specialized, over
    descriptors made in the kernel (C.TMA == 2, common._at_rows)."""
    n_tiles = tl.cdiv(seqs.seqlen_q, C.BLOCK_M)
    first, end, step = _tiles(n_tiles * sched.head_count, C)
    for t in range(first, end, step):
        start_m, bh = _step_tile(t, n_tiles, sched, C.BLOCK_M, C)
        _attn_fwd_tile(start_m, bh, Q, K, V, O, LSE, STATS, strides, seqs, sched, mods, blocks, qk_scale, C, F)


def forward_launches(q, k, v, out, lse, stats, scale: float, offset: int, left: int, right: int, cfg, packed=None,
                     mods=None, blocks=None, split_keys: int = 0):
    """The forward's kernel launches, as (kernel, grid, args, kwargs): attention_forward runs them, the
    compile-time gate (tests/aot_compile.py) compiles exactly them for a target without a GPU. split_keys > 0: the
    batch-invariant mode's splits (a block mask's walk is not split: only this kernel walks one)."""
    (B, Sq, Sk), cu, strides = grid_dims(q, k, packed)
    mod_args, mask_args = modifier_args(mods, scale), block_args(blocks)
    cfg = block_tiles(cfg, blocks)
    Hq, Hkv = q.shape[1], k.shape[1]
    src, tile, opts = tile_args(cfg, reverse_tiles(left, right), q, k, v, packed=packed is not None,
                                invariant=split_keys > 0)
    split_keys = 0 if blocks is not None else split_keys
    seqs = SeqArgs(Sq, Sk, offset, left, right, *cu)
    all_strides = (strides(q), strides(k), strides(v), strides(out), strides(lse)[:2])
    launch_list = []
    for start, count in head_chunks(B * Hq) if Sq > 0 else ():
        sched = Sched(start, count, Hq, Hq // Hkv, split_keys)
        args = dict(seqs=seqs, sched=sched, mods=mod_args, blocks=mask_args)
        launch_list.append((_attn_fwd_kernel, tile_grid(tile, cdiv(Sq, cfg.block_m), count, q.device),
                            (*src, out, lse, stats, all_strides, seqs, sched, mod_args, mask_args, scale * LOG2E),
                            dict(C=tile, F=flags(FORWARD_FLAGS, function_args(mods, blocks), **args), **opts)))
    return launch_list


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
