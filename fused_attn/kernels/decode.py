"""Split-KV attention for inference (flash-decoding), dense or packed: each sequence's query tiles run the forward's
inner loop (`_attn_fwd_inner`) over its keys -- a contiguous or paged cache -- and a sequence whose queries fit one
tile (decode steps, speculative drafts) has its keys cut into ranges run by separate programs, merged by their
log-sum-exps in fp32 by a combine kernel (deterministic, no atomics). One launch sequence serves a packed batch
mixing prefill chunks and decodes: long sequences take the tiled grid, short ones split.

GQA packing: a program holds the `pack` query heads of one kv group for BLOCK_Q query positions, heads innermost
(row r: position start + r // pack, head h0 + r % pack), so each K/V tile is read once per group.

Work items (grid axis 0): first every (sequence, query tile) -- packed sequences in order, sequence b's tiles
starting at item cu_seqlens_q[b] // BLOCK_Q + b (found by binary search), so the grid is sized by the total query
rows, not batch x longest; packed, the rows past the last sequence (cu_seqlens_q[-1] .. the tensor's end) follow as
sequence n_seqs, written 0 with lse -inf, so that out and lse need no fill first -- then, per sequence, splits
1 .. max_splits - 1 of its one tile. Grid axis 1: the query-head groups.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .common import (_block_range, _clamp, _join_sink, _merge_partial, _partial, _sink, _slope, _split_count,
                     _split_range)
from .configs import (capability, cdiv, head_block, interpreter_active, invariant_config, next_power_of_2,
                      smem_limit)
from .forward import _attn_fwd_inner
from .launch import LOG2E, SeqArgs, Sched, Tile, flags, fp32_dot, fresh, modifier_args, run, sm_count


@triton.jit
def _work_item(CU_Q, n_main, n_seqs, tiles, max_splits, BLOCK_Q: tl.constexpr, VARLEN: tl.constexpr):
    """(sequence b, query tile, split) of this program's work item (module docstring)."""
    t = tl.program_id(0)
    if t < n_main:
        if VARLEN:  # the last b <= n_seqs whose first item cu_q[b] // BLOCK_Q + b is <= t (they strictly increase)
            lo = t * 0
            hi = lo + n_seqs + 1
            while hi - lo > 1:
                mid = (lo + hi) // 2
                ok = tl.load(CU_Q + mid) // BLOCK_Q + mid <= t
                lo = tl.where(ok, mid, lo)
                hi = tl.where(ok, hi, mid)
            b = lo
            tile = t - (tl.load(CU_Q + b) // BLOCK_Q + b)
        else:
            b = t // tiles
            tile = t % tiles
        split = t * 0
    else:
        extra = t - n_main
        per = tl.maximum(max_splits - 1, 1)
        b = extra // per
        tile = t * 0
        split = 1 + extra % per
    return b, tile, split


@triton.jit
def _serving_sequence(CU_Q, CU_K, SEQLENS_K, b, seqlen_q, seqlen_k, VARLEN: tl.constexpr, HAS_CU_K: tl.constexpr,
                      HAS_SEQLENS: tl.constexpr):
    """(q0, k0, seqlen_q, seqlen_k) of sequence b: its first query / key row in packed tensors (0 in dense ones),
    its query count (cu_seqlens_q) and key count: seqlens_k[b] where given (FlashAttention-3's seqused_k, a cache's
    filled length), else from cu_seqlens_k, else the launch's."""
    q0 = tl.zeros([], tl.int64)
    k0 = tl.zeros([], tl.int64)
    if VARLEN:
        q0 = tl.load(CU_Q + b).to(tl.int64)
        seqlen_q = (tl.load(CU_Q + b + 1) - q0).to(tl.int32)
    if HAS_CU_K:
        k0 = tl.load(CU_K + b).to(tl.int64)
        seqlen_k = (tl.load(CU_K + b + 1) - k0).to(tl.int32)
    if HAS_SEQLENS:
        seqlen_k = tl.load(SEQLENS_K + b)
    return q0, k0, seqlen_q, seqlen_k


SPLIT_FLAGS = ("HAS_LEFT", "HAS_RIGHT", "PAGED", "HAS_SEQLENS", "VARLEN", "HAS_CU_K", "SOFTCAP", "ALIBI", "HAS_SINKS",
               "FP8_KV", "INVARIANT")


@triton.jit
def _attn_fwd_split_kernel(Q, K, V, O, LSE, strides, seqs, cache, sched, mods, work, scratch, qk_scale,
                           C: tl.constexpr, F: tl.constexpr):
    """The split-KV kernel: one work item (sequence, query tile, split; _work_item) per program along grid axis 0,
    one query-head group per program along axis 1 (_attn_fwd_split_item), as the forward kernel runs its tiles."""
    b, tile, split = _work_item(seqs.CU_Q, work[0], work[1], work[2], work[3], C.BLOCK_Q, F.VARLEN)
    _attn_fwd_split_item(b, tile, split, Q, K, V, O, LSE, strides, seqs, cache, sched, mods, work, scratch, qk_scale,
                         C, F)


@triton.jit
def _attn_fwd_split_item(b, tile, split, Q, K, V, O, LSE, strides, seqs, cache, sched, mods, work, scratch,
                         qk_scale, C: tl.constexpr, F: tl.constexpr):
    """One work item of one query-head group: out and lse of its rows over its key range -- written as they are
    when the sequence is not split (sinks folded in), else as fp32 partials (scratch = (O_PART (splits, n_seqs *
    part_rows, Hq, Dv), LSE_PART (splits, n_seqs * part_rows, Hq), SPLITS[b] the split count)) for the combine
    kernel. strides: (batch, head, row, col) of q, k, v, out; lse's batch and head. K, V: (B, Hkv, S, D)-indexed
    (packed: B = 1, sequence b from row cu_seqlens_k[b]), or paged (pages, Hkv, page_size, D)-indexed (F.PAGED)
    with cache = (the block table's row stride, SEQLENS_K: keys per sequence (F.HAS_SEQLENS), PAGES: the
    (B, max_pages) block table), C.PAGE_SIZE keys per page (a constant: a few values in practice, and a multiple of
    BLOCK_N makes each tile one page). work = (n_main, n_seqs, tiles, max_splits, min_tiles, part_rows, n_rows: q's
    rows): the work items (module docstring). F.FP8_KV: K and V hold FP8, dequantized by mods.K_DESCALE /
    V_DESCALE (B, Hkv)-indexed (strides 0 where one value serves all). F.INVARIANT (the batch-invariant mode): the
    keys cut at multiples of sched.split_keys, as the forward cuts them -- a split sequence's program j runs split
    j, any other program all of its splits, merged in key order (_merge_partial)."""
    sq, sk, sv, so, sl = strides
    stride_pb, SEQLENS_K, PAGES = cache
    n_main, n_seqs, tiles, max_splits, min_tiles, part_rows, n_rows = work
    BLOCK_Q: tl.constexpr = C.BLOCK_Q
    BLOCK_M: tl.constexpr = C.BLOCK_M
    BLOCK_N: tl.constexpr = C.BLOCK_N
    PACK: tl.constexpr = C.PACK
    BLOCK_DV: tl.constexpr = C.BLOCK_DV  # named: Triton 3.6 takes no tuple field in a shape list
    if F.VARLEN:
        if b == n_seqs:  # the rows past the last sequence (module docstring)
            _store_empty_rows(O, LSE, tl.load(seqs.CU_Q + b).to(tl.int64), n_rows, tile, so, sl, C)
            return
    q0, k0, seqlen_q, seqlen_k = _serving_sequence(seqs.CU_Q, seqs.CU_K, SEQLENS_K, b, seqs.seqlen_q, seqs.seqlen_k,
                                                   F.VARLEN, F.HAS_CU_K, F.HAS_SEQLENS)
    pos_start = tile * BLOCK_Q
    if pos_start >= seqlen_q:  # the items cover each sequence's tiles rounded up
        return
    offset = seqlen_k - seqlen_q  # bottom-right per sequence
    left, right = seqs.left, seqs.right
    lo, full_lo, full_hi, hi = _block_range(pos_start, seqlen_q, seqlen_k, offset, left, right, BLOCK_Q, BLOCK_N,
                                            F.HAS_LEFT, F.HAS_RIGHT)
    # A sequence of one tile splits its key tiles into ranges of at least min_tiles; depends on the sequence alone
    # and the launch's max_splits, which caps it (num_splits where given: then a sequence splits the same alone or in
    # any batch; else the plan's choice, which follows the batch). INVARIANT: the mode's splits, one per program
    # (all in one program where the launch has fewer).
    n_parts = 1  # the mode's splits this program runs
    if F.INVARIANT:
        n_parts = _split_count(lo, hi, sched.split_keys)
    n_split = 1
    if C.COMBINE:
        if F.INVARIANT:
            n_split = tl.where((seqlen_q <= BLOCK_Q) & (n_parts <= max_splits), n_parts, 1)
        else:
            n_split = tl.where(seqlen_q <= BLOCK_Q, _clamp((hi - lo) // BLOCK_N // min_tiles, 1, max_splits), 1)
        if split >= n_split:
            return
        if (split == 0) & (tl.program_id(1) == 0):
            tl.store(scratch[2] + b, n_split)
    first_part = 0
    s_lo, s_hi = lo, hi
    if F.INVARIANT:
        first_part = tl.where(n_split > 1, split, 0)
        n_parts = tl.where(n_split > 1, 1, n_parts)
    else:
        per_split = tl.cdiv((hi - lo) // BLOCK_N, n_split) * BLOCK_N
        s_lo = tl.minimum(lo + split * per_split, hi)
        s_hi = tl.minimum(s_lo + per_split, hi)

    h0 = tl.program_id(1) * PACK
    hk = h0 // sched.group
    b64, hk64 = b.to(tl.int64), hk.to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    pos = pos_start + rows // PACK
    heads = h0 + rows % PACK
    row_ok = (rows < BLOCK_Q * PACK) & (pos < seqlen_q)
    offs_d = tl.arange(0, C.BLOCK_D)
    Q += b64 * sq[0] + q0 * sq[2]  # at the sequence's first row: offsets within it stay 32-bit
    O += b64 * so[0] + q0 * so[2]
    LSE += b64 * sl[0] + q0
    q_ptrs = Q + heads.to(tl.int64)[:, None] * sq[1] + pos[:, None] * sq[2] + offs_d[None, :] * sq[3]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < C.HEAD_DIM), other=0.0)
    if F.PAGED:  # K and V at the head; the pages sk[0] / sv[0] apart
        Kh = K + hk64 * sk[1]
        Vh = V + hk64 * sv[1]
        kv = (b, hk, (sk[2], sk[3]), (sv[2], sv[3]), (PAGES + b64 * stride_pb, sk[0], sv[0]))
    else:
        Kh = K + b64 * sk[0] + hk64 * sk[1] + k0 * sk[2]
        Vh = V + b64 * sv[0] + hk64 * sv[1] + k0 * sv[2]
        kv = (b, hk, (sk[2], sk[3]), (sv[2], sv[3]), None)

    k_descale = tl.full([], 1.0, tl.float32)
    v_descale = k_descale
    if F.FP8_KV:  # an FP8 cache: this sequence's and kv head's dequantization factors
        d = b64 * mods.descale_strides[0] + hk64 * mods.descale_strides[1]
        k_descale = tl.load(mods.K_DESCALE + d)
        v_descale = tl.load(mods.V_DESCALE + d)
    slope = _slope(mods.SLOPES, b, heads, mods.slope_strides[0], mods.slope_strides[1], qk_scale,
                   F.ALIBI)  # one per row: heads are packed
    if F.ALIBI:
        slope = slope[:, None]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    o_all, lse_all = acc, m_i  # the splits merged so far (INVARIANT)
    seq = (seqlen_q, seqlen_k, offset, left, right)
    head_rows = (heads, 0, slope, 0, 0, k_descale)  # no dropout: inference only
    for step in range(n_parts):
        if F.INVARIANT:
            s_lo, s_hi = _split_range(first_part + step, lo, hi, sched.split_keys)
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        for seg in tl.static_range(3):  # masked edge, unmasked middle, masked edge -- within this split's range
            seg_lo = s_lo if seg == 0 else _clamp(full_lo if seg == 1 else full_hi, s_lo, s_hi)
            seg_hi = _clamp(full_lo, s_lo, s_hi) if seg == 0 else (_clamp(full_hi, s_lo, s_hi) if seg == 1 else s_hi)
            acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, Kh, Vh, kv, pos, seg_lo, seg_hi, seq, qk_scale, mods,
                                            head_rows, None, 0, C, F, seg != 1)
        if F.INVARIANT:
            if F.FP8_KV:
                acc = acc * v_descale
            o_s, lse_s = _partial(acc, l_i, m_i, qk_scale)
            o_all, lse_all = _merge_partial(o_all, lse_all, o_s, lse_s)

    if F.INVARIANT:  # the sinks join as a split of output 0, here or in the combine kernel
        out, lse = o_all, lse_all
        if F.HAS_SINKS:
            if n_split == 1:
                out, lse = _merge_partial(out, lse, 0.0, _sink(mods.SINKS, heads, 1.4426950408889634, True))
    else:
        if F.FP8_KV:
            acc = acc * v_descale
        if F.HAS_SINKS:  # the sinks join the rows of a sequence not split (the combine kernel adds them otherwise)
            if n_split == 1:
                acc, l_i, m_i = _join_sink(acc, l_i, m_i, _sink(mods.SINKS, heads, qk_scale, True), qk_scale)
        out, lse = _partial(acc, l_i, m_i, qk_scale)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = row_ok[:, None] & (offs_dv[None, :] < C.HEAD_DIM_V)
    # The partials' branch only where COMBINE says the launch has them: n_split is a runtime value, and a branch
    # the compiler keeps must not touch O_PART / LSE_PART, which are None without splits.
    if C.COMBINE:
        if n_split == 1:
            _store_rows(O, LSE, out, lse, heads, pos, mask, row_ok, offs_dv, so[1], so[2], so[3], sl[1])
        else:
            part = ((split * n_seqs + b64) * part_rows + pos) * sched.n_heads + heads
            tl.store(scratch[0] + part[:, None] * C.HEAD_DIM_V + offs_dv[None, :], out, mask=mask)
            tl.store(scratch[1] + part, lse, mask=row_ok)
    else:
        _store_rows(O, LSE, out, lse, heads, pos, mask, row_ok, offs_dv, so[1], so[2], so[3], sl[1])


@triton.jit
def _store_empty_rows(O, LSE, q0, n_rows, tile, so, sl, C: tl.constexpr):
    """Query tile `tile` of the rows q0 .. n_rows - 1 of a packed batch (those past its last sequence), this
    program's query-head group: out 0, lse -inf."""
    BLOCK_M: tl.constexpr = C.BLOCK_M
    BLOCK_DV: tl.constexpr = C.BLOCK_DV
    rows = tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    pos = tile * C.BLOCK_Q + rows // C.PACK
    row_ok = (rows < C.BLOCK_Q * C.PACK) & (pos < n_rows - q0)
    _store_rows(O + q0 * so[2], LSE + q0, tl.zeros([BLOCK_M, BLOCK_DV], tl.float32),
                tl.full([BLOCK_M], float("-inf"), tl.float32), tl.program_id(1) * C.PACK + rows % C.PACK, pos,
                row_ok[:, None] & (offs_dv[None, :] < C.HEAD_DIM_V), row_ok, offs_dv, so[1], so[2], so[3], sl[1])


@triton.jit
def _store_rows(O, LSE, out, lse, heads, pos, mask, row_ok, offs_dv, stride_oh, stride_os, stride_od, stride_lh):
    """A tile's final rows: out in O's dtype, the lse."""
    heads64 = heads.to(tl.int64)
    o_rows = heads64 * stride_oh + pos * stride_os
    tl.store(O + o_rows[:, None] + offs_dv[None, :] * stride_od, out.to(O.dtype.element_ty), mask=mask)
    tl.store(LSE + heads64 * stride_lh + pos, lse, mask=row_ok)


COMBINE_FLAGS = ("VARLEN", "HAS_SINKS", "INVARIANT")


@triton.jit
def _attn_combine_kernel(O_PART, LSE_PART, O, LSE, SPLITS, CU_Q, SINKS, n_seqs, n_heads, seqlen_q, part_rows, so, sl,
                         HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
                         BLOCK_Q: tl.constexpr, F: tl.constexpr):
    """Sequence b = program_id(0), query head h = program_id(1), if it was split: lse = log sum_s exp(lse_s),
    out = sum_s exp(lse_s - lse) out_s, in fp32 and in split order (merge_attention's formula), exp(sink) of the
    head joining the sum as a split whose output is 0; rows empty everywhere get out 0, lse -inf. F.INVARIANT: the
    same sum as the batch-invariant forward's left fold, one split after another (_merge_partial). so / sl: out's
    (batch, head, row, col) and lse's (batch, head) strides."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    q0, _, seqlen_q, _ = _serving_sequence(CU_Q, None, None, b, seqlen_q, 0, F.VARLEN, False, False)
    if (seqlen_q == 0) | (seqlen_q > BLOCK_Q):  # no rows, or a sequence of several tiles: never split
        return
    n_split = tl.load(SPLITS + b)
    if n_split == 1:
        return
    pos = tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = pos < seqlen_q
    b64 = b.to(tl.int64)
    part = (b64 * part_rows + pos) * n_heads + h  # split 0's row
    step = (b64 * 0 + n_seqs) * part_rows * n_heads
    sink = _sink(SINKS, h, 1.4426950408889634, F.HAS_SINKS)  # in natural-log units
    if F.INVARIANT:
        out = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        lse = tl.full([BLOCK_M], float("-inf"), tl.float32)
        for s in range(n_split):
            out, lse = _merge_partial(out, lse,
                                      tl.load(O_PART + (s * step + part)[:, None] * HEAD_DIM_V + offs_dv[None, :],
                                              mask=m_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0),
                                      tl.load(LSE_PART + s * step + part, mask=m_ok, other=float("-inf")))
        if F.HAS_SINKS:
            out, lse = _merge_partial(out, lse, 0.0, sink)
    else:
        m = tl.maximum(tl.full([BLOCK_M], float("-inf"), tl.float32), sink)
        for s in range(n_split):
            m = tl.maximum(m, tl.load(LSE_PART + s * step + part, mask=m_ok, other=float("-inf")))
        m_sub = tl.where(m == float("-inf"), 0.0, m)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        for s in range(n_split):
            w = tl.exp(tl.load(LSE_PART + s * step + part, mask=m_ok, other=float("-inf")) - m_sub)
            o = tl.load(O_PART + (s * step + part)[:, None] * HEAD_DIM_V + offs_dv[None, :],
                        mask=m_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
            acc += w[:, None] * o
            l_i += w
        if F.HAS_SINKS:
            l_i += tl.exp(sink - m_sub)
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), m_sub + tl.log(tl.where(empty, 1.0, l_i)))
    row = b64 * so[0] + h.to(tl.int64) * so[1] + (q0 + pos) * so[2]
    tl.store(O + row[:, None] + offs_dv[None, :] * so[3], out.to(O.dtype.element_ty),
             mask=m_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
    tl.store(LSE + b64 * sl[0] + h * sl[1] + q0 + pos, lse, mask=m_ok)


# Tiles: decode is memory-bound, so a program's rows are a kv group's query heads at BLOCK_Q positions, up to ROWS
# (fewer under the interpreter, where every row costs CPU time), against 64 keys at a time.
ROWS, INTERPRETER_ROWS = 64, 16
INTERPRETER_BLOCK_N = 32
# A sequence of one query tile splits its keys into at most MAX_SPLITS ranges of at least MIN_TILES key tiles:
# enough programs for a GPU even at batch 1, while the partials stay a small fraction of the keys' bytes.
MAX_SPLITS, MIN_TILES = 32, 4


def serving_tiles(group: int, seqlen_q=None, rows=None):
    """(pack, block_q, block_m): query heads per program (the whole kv group), query positions per tile and the
    tile's rows (at most `rows`; the batch-invariant mode gives the forward's block_m, and the tile is padded to it).
    Packed batches (seqlen_q None) take the same tiles whatever the batch holds, so a sequence gives bitwise the same
    result alone and in any batch; a dense batch's tiles shrink to its query length."""
    fixed = rows is not None
    rows = rows or (INTERPRETER_ROWS if interpreter_active() else ROWS)
    pack = group if group <= rows else 1
    block_q = max(1, rows // next_power_of_2(pack))
    if seqlen_q is not None:
        block_q = min(block_q, next_power_of_2(max(seqlen_q, 1)))
    return pack, block_q, rows if fixed else max(16, next_power_of_2(block_q * pack))


# The batch-invariant mode runs each split of a sequence in its own program up to this many splits (longer
# sequences: all of their splits in one program, the same bits); its scratch grows with them.
MAX_INVARIANT_SPLITS = 128


def split_plan(num_splits: int, max_seqlen_k: int, block_n: int, programs: int, sms: int):
    """(max_splits, min_tiles): num_splits ranges of any size where given (FlashAttention's num_splits; 1: none);
    else (0) none where the `programs` of an unsplit launch already fill the `sms`, otherwise enough ranges for
    about two waves of programs, each of at least MIN_TILES key tiles of the longest sequence, up to MAX_SPLITS.
    (The batch-invariant mode plans its own: _invariant_plan.)"""
    if num_splits > 0:
        return num_splits, 1
    if programs >= sms:
        return 1, MIN_TILES
    return max(1, min(MAX_SPLITS, cdiv(max_seqlen_k, block_n) // MIN_TILES, cdiv(2 * sms, programs))), \
        MIN_TILES


def wants_split(batch: int, heads_q: int, seqlen_q: int, seqlen_k: int, device) -> bool:
    """Whether the dense forward should take the split-KV path: few query rows (decode steps, Sq <= 16), so its grid
    of (batch * heads) programs would leave SMs idle, and keys for several tiles to split."""
    block_n = INTERPRETER_BLOCK_N if interpreter_active() else 64
    return seqlen_q <= 16 and batch * heads_q < sm_count(device) and seqlen_k >= 4 * block_n


@dataclass(frozen=True)
class DecodePlan:
    """What the split-KV launches take beside the tensors: tiles, warps, stages, the split plan and the scratch
    for split partials. Made per call (decode_plan), or once per step by fused_attn.get_scheduler_metadata and
    reused by every layer (the scratch too: the layers' launches run one after another on a stream)."""
    pack: int
    block_q: int
    block_m: int
    block_n: int
    stages: int
    warps: int
    tiles: int
    splits: int
    min_tiles: int
    part_rows: int
    scratch: tuple  # (o_part, lse_part, split_counts) float32 / int32, or three Nones without splits
    split_keys: int = 0  # the batch-invariant mode's keys per split (0: the mode is off)


def decode_plan(heads_q: int, heads_kv: int, D: int, Dv: int, dtype: torch.dtype, device, n_seqs: int,
                seqlen_q: int, max_seqlen_k: int, num_splits: int = 0, total_q: Optional[int] = None,
                cc=None, sm_margin: int = 0, split_keys: int = 0) -> DecodePlan:
    """The plan of a split-KV call: n_seqs sequences of seqlen_q queries (packed: at most seqlen_q each, total_q
    rows in all, or a bound on them) against at most max_seqlen_k keys, heads_q query heads over heads_kv kv heads
    of head dims D / Dv; cc: the GPU's compute capability (None: the device's, or the interpreter's); sm_margin:
    SMs the split plan leaves to other work; split_keys > 0: the batch-invariant mode (the forward's tiles, rows,
    warps and stages -- configs.invariant_config -- and its splits)."""
    cc = capability(device) if cc is None and device.type != "meta" else cc
    packed = total_q is not None
    if split_keys:
        return _invariant_plan(heads_q, heads_kv, D, Dv, dtype, device, n_seqs, seqlen_q, max_seqlen_k, packed,
                               cc, split_keys)
    bd, bdv, size = head_block(D), head_block(Dv), dtype.itemsize
    pack, block_q, block_m = serving_tiles(heads_q // heads_kv, None if packed else seqlen_q)
    block_n = INTERPRETER_BLOCK_N if interpreter_active() else 64
    if block_m < 64 and max(bd, bdv) == 128 and cc is not None and cc[0] < 9:
        block_n = 32  # decode tiles on mma.sync GPUs at D = 128: 64 keys spill 4 bytes (Triton 3.6 and 3.9 alike)
    # Triton keeps num_stages - 1 K / V tiles in shared memory: 2 where they fit (pipelined, by the compile-time
    # gate), keeping ~12% for the compiler's own buffers; narrower key tiles where two do not (99 KB GPUs, D = 256).
    room = 0 if cc is None else smem_limit(cc) * 7 // 8 - block_m * bd * size
    while cc is not None and block_n > 16 and room // (block_n * (bd + bdv) * size) < 2:
        block_n //= 2
    tiles = cdiv(seqlen_q, block_q)
    n_main = n_seqs * tiles if not packed else total_q // block_q + n_seqs
    splits, min_tiles = split_plan(num_splits, max_seqlen_k, block_n, n_main * (heads_q // pack),
                                   max(1, sm_count(device) - sm_margin))
    part_rows = min(block_q, seqlen_q)
    stages = 1 + max(0, min(2, room // (block_n * (bd + bdv) * size)))
    # 64-row (prefill) tiles from D = 128 on: 8 warps (4 spill on sm_80; the compile-time gate).
    warps = 8 if block_m >= 64 and max(bd, bdv) >= 128 else 4
    return DecodePlan(pack, block_q, block_m, block_n, stages, warps, tiles, splits, min_tiles, part_rows,
                      _scratch(splits, n_seqs, part_rows, heads_q, Dv, device))


def _scratch(splits: int, n_seqs: int, part_rows: int, heads_q: int, Dv: int, device):
    """Split partials' buffers: (o_part, lse_part, split_counts), or three Nones without splits."""
    if splits == 1:
        return None, None, None
    f32 = torch.float32
    return (fresh(torch.empty(splits, n_seqs * part_rows, heads_q, Dv, device=device, dtype=f32)),
            fresh(torch.empty(splits, n_seqs * part_rows, heads_q, device=device, dtype=f32)),
            fresh(torch.empty(n_seqs, device=device, dtype=torch.int32)))


def _invariant_plan(heads_q, heads_kv, D, Dv, dtype, device, n_seqs, seqlen_q, max_seqlen_k, packed, cc,
                    split_keys) -> DecodePlan:
    """The batch-invariant mode's plan: the forward's tile (block_m rows, block_n keys, warps), so a decode row takes
    the same MMA and key tiles as a prefill row; the splits of split_keys keys the longest sequence needs, one
    program each (whatever num_splits and the SM count), up to MAX_INVARIANT_SPLITS."""
    cfg = invariant_config(D, Dv, dtype, cc, split_keys)
    pack, block_q, block_m = serving_tiles(heads_q // heads_kv, None if packed else seqlen_q, rows=cfg.block_m)
    splits = max(1, min(MAX_INVARIANT_SPLITS, cdiv(max_seqlen_k, split_keys)))
    part_rows = min(block_q, seqlen_q)
    return DecodePlan(pack, block_q, block_m, cfg.block_n, cfg.num_stages, cfg.num_warps, cdiv(seqlen_q, block_q),
                      splits, 1, part_rows, _scratch(splits, n_seqs, part_rows, heads_q, Dv, device), split_keys)


def decode_launches(q, k, v, out, lse, seqlens_k, block_table, page_size: int, max_seqlen_k: int, scale: float,
                    left: int, right: int, num_splits: int = 0, cc=None, mods=None, packed=None,
                    plan: Optional[DecodePlan] = None, split_keys: int = 0):
    """The split-KV launches as (kernel, grid, args, kwargs), their plan made (decode_plan; split_keys > 0: the
    batch-invariant mode's) unless given.

    q, out: (B, Hq, Sq, D / Dv)-indexed views; lse (B, Hq, Sq) float32 contiguous. Packed (a Packed): B = 1, rows
    cu_seqlens_q[b] .. of sequence b; cu_seqlens_k None where the keys are paged (or per sequence in seqlens_k).
    k, v: (B, Hkv, S, D)-indexed views of a contiguous cache, or, with block_table (B, max_pages) int32,
    (pages, Hkv, page_size, D)-indexed views of a paged one. seqlens_k: int32 (B,) keys per sequence (None: from
    cu_seqlens_k, else max_seqlen_k for every row). mods: a Modifiers with softcap / ALiBi / sinks (no dropout:
    inference only) and, for FP8 caches, k_descale / v_descale float32 (B, Hkv), of the same strides."""
    Hq, D = q.shape[1], q.shape[3]
    Hkv, Dv = k.shape[1], v.shape[3]
    group = Hq // Hkv
    if packed is None:
        n_seqs, seqlen_q, cu_q, cu_k = q.shape[0], q.shape[2], None, None
    else:
        n_seqs, seqlen_q = packed.cu_seqlens_q.shape[0] - 1, packed.max_seqlen_q
        cu_q, cu_k = packed.cu_seqlens_q, packed.cu_seqlens_k
    if not launches_rows(n_seqs, seqlen_q, q.shape[2]):
        return []
    if plan is None:
        plan = decode_plan(Hq, Hkv, D, Dv, q.dtype, q.device, n_seqs, seqlen_q, max_seqlen_k, num_splits,
                           None if packed is None else q.shape[2], cc, split_keys=split_keys)
    splits, combine = plan.splits, plan.splits > 1
    o_part, lse_part, split_counts = plan.scratch
    paged = block_table is not None
    batch0 = (lambda t: (0, *t.stride()[1:])) if packed is not None else (lambda t: tuple(t.stride()))
    kv_strides = (lambda t: tuple(t.stride())) if paged else batch0
    tile = Tile(D, Dv, plan.block_m, plan.block_n, head_block(D), head_block(Dv),
                fp32_dot(q.dtype, plan.split_keys > 0),
                BLOCK_Q=plan.block_q, PACK=plan.pack, COMBINE=combine, PAGE_SIZE=page_size if paged else 0)
    mod_args = modifier_args(mods, scale)
    if mods is not None and mods.q_descale is not None:
        raise ValueError("the split-KV kernels take FP8 caches with 16/32-bit queries, not FP8 queries")
    lse_strides = batch0(lse)[:2]
    part_rows = plan.part_rows
    # Packed: one more item for the rows past the last sequence (module docstring).
    n_main = n_seqs * plan.tiles if packed is None else q.shape[2] // plan.block_q + n_seqs + 1
    seqs = SeqArgs(seqlen_q, max_seqlen_k, 0, left, right, cu_q, cu_k)
    sched = Sched(0, Hq, Hq, group, plan.split_keys)
    f = flags(SPLIT_FLAGS, seqs=seqs, sched=sched, mods=mod_args, PAGES=block_table, SEQLENS_K=seqlens_k)
    launch_list = [(_attn_fwd_split_kernel, (n_main + (n_seqs * (splits - 1) if combine else 0), Hq // plan.pack),
                    (q, k, v, out, lse, (batch0(q), kv_strides(k), kv_strides(v), batch0(out), lse_strides), seqs,
                     (block_table.stride(0) if paged else 0, seqlens_k, block_table), sched, mod_args,
                     (n_main, n_seqs, plan.tiles, splits, plan.min_tiles, part_rows, q.shape[2]), plan.scratch,
                     scale * LOG2E),
                    dict(C=tile, F=f, num_warps=plan.warps, num_stages=plan.stages))]
    if combine:
        launch_list.append((_attn_combine_kernel, (n_seqs, Hq),
                            (o_part, lse_part, out, lse, split_counts, cu_q, mod_args.SINKS, n_seqs, Hq, seqlen_q,
                             part_rows, batch0(out), lse_strides),
                            dict(HEAD_DIM_V=Dv, BLOCK_M=next_power_of_2(part_rows), BLOCK_DV=head_block(Dv),
                                 BLOCK_Q=plan.block_q, F=flags(COMBINE_FLAGS, seqs=seqs, mods=mod_args,
                                                               sched=sched))))
    return launch_list


def launches_rows(n_seqs: int, seqlen_q: int, rows: int) -> bool:
    """Whether split-KV launches run for n_seqs sequences of at most seqlen_q queries in `rows` query rows; where
    they do, they write every row of out and lse (a packed batch's rows past its last sequence too)."""
    return n_seqs > 0 and seqlen_q > 0 and rows > 0


def attention_decode(q, k, v, out, lse, seqlens_k, block_table, page_size: int, max_seqlen_k: int, scale: float,
                     left: int, right: int, num_splits: int = 0, mods=None, packed=None, plan=None,
                     split_keys: int = 0):
    """Launch split-KV attention (decode_launches) and count it as "decode"; writes out and lse."""
    run(decode_launches(q, k, v, out, lse, seqlens_k, block_table, page_size, max_seqlen_k, scale, left, right,
                        num_splits, mods=mods, packed=packed, plan=plan, split_keys=split_keys), "decode")
    return out, lse
