"""Split-KV attention for inference (flash-decoding), dense or packed: each sequence's query tiles run the forward's
inner loop (`_attn_fwd_inner`) over its keys -- a contiguous or paged cache -- and a sequence whose queries fit one
tile (decode steps, speculative drafts) has its keys cut into ranges run by separate programs, merged by their
log-sum-exps in fp32 by a combine kernel (deterministic, no atomics). One launch sequence serves a packed batch
mixing prefill chunks and decodes: long sequences take the tiled grid, short ones split.

GQA packing: a program holds the `pack` query heads of one kv group for BLOCK_Q query positions, heads innermost
(row r: position start + r // pack, head h0 + r % pack), so each K/V tile is read once per group.

Work items (grid axis 0): first every (sequence, query tile) -- packed sequences in order, sequence b's tiles
starting at item cu_seqlens_q[b] // BLOCK_Q + b (found by binary search), so the grid is sized by the total query
rows, not batch x longest -- then, per sequence, splits 1 .. max_splits - 1 of its one tile. Grid axis 1: the
query-head groups.
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
from .launch import LOG2E, features, fp32_dot, modifier_args, run, sm_count


@triton.jit
def _work_item(CU_Q, n_main, n_seqs, tiles, max_splits, BLOCK_Q: tl.constexpr, VARLEN: tl.constexpr):
    """(sequence b, query tile, split) of this program's work item (module docstring)."""
    t = tl.program_id(0)
    if t < n_main:
        if VARLEN:  # the last b whose first item cu_q[b] // BLOCK_Q + b is <= t (they strictly increase)
            lo = t * 0
            hi = lo + n_seqs
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


@features("HAS_LEFT", "HAS_RIGHT", "PAGED", "HAS_SEQLENS", "VARLEN", "HAS_CU_K", "SOFTCAP", "ALIBI", "HAS_SINKS",
          "FP8_KV", "INVARIANT")
@triton.jit
def _attn_fwd_split_kernel(Q, K, V, O, LSE, O_PART, LSE_PART, SPLITS, CU_Q, CU_K, SEQLENS_K, PAGES, SLOPES, SINKS,
                           K_DESCALE, V_DESCALE,
                           stride_qb, stride_qh, stride_qs, stride_qd,
                           stride_kb, stride_kh, stride_ks, stride_kd,
                           stride_vb, stride_vh, stride_vs, stride_vd,
                           stride_ob, stride_oh, stride_os, stride_od,
                           stride_lb, stride_lh, stride_pb, stride_ab, stride_ah, stride_db, stride_dh,
                           n_main, n_seqs, tiles, max_splits, min_tiles, part_rows,
                           n_heads, group, seqlen_q, seqlen_k, left, right, qk_scale, cap_in, cap_out, split_keys,
                           HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PACK: tl.constexpr,
                           HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, FP32_DOT: tl.constexpr,
                           PAGED: tl.constexpr, HAS_SEQLENS: tl.constexpr, VARLEN: tl.constexpr,
                           HAS_CU_K: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                           HAS_SINKS: tl.constexpr, FP8_KV: tl.constexpr, COMBINE: tl.constexpr,
                           PAGE_SIZE: tl.constexpr, INVARIANT: tl.constexpr):
    """One work item of one query-head group: out and lse of its rows over its key range -- written as they are
    when the sequence is not split (sinks folded in), else as fp32 partials (O_PART (splits, n_seqs * part_rows,
    Hq, Dv), LSE_PART (splits, n_seqs * part_rows, Hq)) for the combine kernel, SPLITS[b] the split count.
    K, V: (B, Hkv, S, D)-indexed (packed: B = 1, sequence b from row cu_seqlens_k[b]), or paged (pages, Hkv,
    page_size, D)-indexed with PAGES the (B, max_pages) block table, PAGE_SIZE keys per page (a constant: a few
    values in practice, and a multiple of BLOCK_N makes each tile one page). FP8_KV: K and V hold FP8, dequantized by
    K_DESCALE / V_DESCALE (B, Hkv)-indexed (strides 0 where one value serves all). INVARIANT (the batch-invariant
    mode): the keys cut at multiples of split_keys, as the forward cuts them -- a split sequence's program j runs
    split j, any other program all of its splits, merged in key order (_merge_partial)."""
    b, tile, split = _work_item(CU_Q, n_main, n_seqs, tiles, max_splits, BLOCK_Q, VARLEN)
    q0, k0, seqlen_q, seqlen_k = _serving_sequence(CU_Q, CU_K, SEQLENS_K, b, seqlen_q, seqlen_k, VARLEN, HAS_CU_K,
                                                   HAS_SEQLENS)
    pos_start = tile * BLOCK_Q
    if pos_start >= seqlen_q:  # the items cover each sequence's tiles rounded up
        return
    offset = seqlen_k - seqlen_q  # bottom-right per sequence
    lo, full_lo, full_hi, hi = _block_range(pos_start, seqlen_q, seqlen_k, offset, left, right, BLOCK_Q, BLOCK_N,
                                            HAS_LEFT, HAS_RIGHT)
    # A sequence of one tile splits its key tiles into ranges of at least min_tiles; depends on the sequence alone
    # and the launch's max_splits, which caps it (num_splits where given: then a sequence splits the same alone or in
    # any batch; else the plan's choice, which follows the batch). INVARIANT: the mode's splits, one per program
    # (all in one program where the launch has fewer).
    n_parts = 1  # the mode's splits this program runs
    if INVARIANT:
        n_parts = _split_count(lo, hi, split_keys)
    n_split = 1
    if COMBINE:
        if INVARIANT:
            n_split = tl.where((seqlen_q <= BLOCK_Q) & (n_parts <= max_splits), n_parts, 1)
        else:
            n_split = tl.where(seqlen_q <= BLOCK_Q, _clamp((hi - lo) // BLOCK_N // min_tiles, 1, max_splits), 1)
        if split >= n_split:
            return
        if (split == 0) & (tl.program_id(1) == 0):
            tl.store(SPLITS + b, n_split)
    first_part = 0
    s_lo, s_hi = lo, hi
    if INVARIANT:
        first_part = tl.where(n_split > 1, split, 0)
        n_parts = tl.where(n_split > 1, 1, n_parts)
    else:
        per_split = tl.cdiv((hi - lo) // BLOCK_N, n_split) * BLOCK_N
        s_lo = tl.minimum(lo + split * per_split, hi)
        s_hi = tl.minimum(s_lo + per_split, hi)

    h0 = tl.program_id(1) * PACK
    hk = h0 // group
    b64, hk64 = b.to(tl.int64), hk.to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    pos = pos_start + rows // PACK
    heads = h0 + rows % PACK
    row_ok = (rows < BLOCK_Q * PACK) & (pos < seqlen_q)
    offs_d = tl.arange(0, BLOCK_D)
    Q += b64 * stride_qb + q0 * stride_qs  # at the sequence's first row: offsets within it stay 32-bit
    O += b64 * stride_ob + q0 * stride_os
    LSE += b64 * stride_lb + q0
    q_ptrs = (Q + heads.to(tl.int64)[:, None] * stride_qh + pos[:, None] * stride_qs
              + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if PAGED:
        Kh = K + hk64 * stride_kh
        Vh = V + hk64 * stride_vh
        PAGES += b64 * stride_pb
    else:
        Kh = K + b64 * stride_kb + hk64 * stride_kh + k0 * stride_ks
        Vh = V + b64 * stride_vb + hk64 * stride_vh + k0 * stride_vs

    k_descale = tl.full([], 1.0, tl.float32)
    v_descale = k_descale
    if FP8_KV:  # an FP8 cache: this sequence's and kv head's dequantization factors
        k_descale = tl.load(K_DESCALE + b64 * stride_db + hk64 * stride_dh)
        v_descale = tl.load(V_DESCALE + b64 * stride_db + hk64 * stride_dh)
    slope = _slope(SLOPES, b, heads, stride_ab, stride_ah, qk_scale, ALIBI)  # one per row: heads are packed
    if ALIBI:
        slope = slope[:, None]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    o_all, lse_all = acc, m_i  # the splits merged so far (INVARIANT)
    for step in range(n_parts):
        if INVARIANT:
            s_lo, s_hi = _split_range(first_part + step, lo, hi, split_keys)
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        for seg in tl.static_range(3):  # masked edge, unmasked middle, masked edge -- within this split's range
            seg_lo = s_lo if seg == 0 else _clamp(full_lo if seg == 1 else full_hi, s_lo, s_hi)
            seg_hi = _clamp(full_lo, s_lo, s_hi) if seg == 0 else (_clamp(full_hi, s_lo, s_hi) if seg == 1 else s_hi)
            acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, Kh, Vh, b, hk, stride_ks, stride_kd, stride_vs,
                                            stride_vd, pos, seg_lo, seg_hi, seqlen_q, seqlen_k, offset, left, right,
                                            qk_scale,
                                            HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV,
                                            HAS_LEFT, HAS_RIGHT, seg != 1, FP32_DOT, False,
                                            PAGES, PAGE_SIZE, stride_kb, stride_vb, PAGED,
                                            cap_in, cap_out, slope, SOFTCAP, ALIBI, 0, 0, 0, 0, False,
                                            None, None, 0, None, 1, 1, False, heads, None, None, False, (), None,
                                            (), k_descale, FP8_KV, False)
        if INVARIANT:
            if FP8_KV:
                acc = acc * v_descale
            o_s, lse_s = _partial(acc, l_i, m_i, qk_scale)
            o_all, lse_all = _merge_partial(o_all, lse_all, o_s, lse_s)

    if INVARIANT:  # the sinks join as a split of output 0, here or in the combine kernel
        out, lse = o_all, lse_all
        if HAS_SINKS:
            if n_split == 1:
                out, lse = _merge_partial(out, lse, 0.0, _sink(SINKS, heads, 1.4426950408889634, HAS_SINKS))
    else:
        if FP8_KV:
            acc = acc * v_descale
        if HAS_SINKS:  # the sinks join the rows of a sequence not split (the combine kernel adds them otherwise)
            if n_split == 1:
                acc, l_i, m_i = _join_sink(acc, l_i, m_i, _sink(SINKS, heads, qk_scale, HAS_SINKS), qk_scale)
        out, lse = _partial(acc, l_i, m_i, qk_scale)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V)
    # The partials' branch only where COMBINE says the launch has them: n_split is a runtime value, and a branch
    # the compiler keeps must not touch O_PART / LSE_PART, which are None without splits.
    if COMBINE:
        if n_split == 1:
            _store_rows(O, LSE, out, lse, heads, pos, mask, row_ok, offs_dv, stride_oh, stride_os, stride_od,
                        stride_lh)
        else:
            part = ((split * n_seqs + b64) * part_rows + pos) * n_heads + heads
            tl.store(O_PART + part[:, None] * HEAD_DIM_V + offs_dv[None, :], out, mask=mask)
            tl.store(LSE_PART + part, lse, mask=row_ok)
    else:
        _store_rows(O, LSE, out, lse, heads, pos, mask, row_ok, offs_dv, stride_oh, stride_os, stride_od, stride_lh)


@triton.jit
def _store_rows(O, LSE, out, lse, heads, pos, mask, row_ok, offs_dv, stride_oh, stride_os, stride_od, stride_lh):
    """A tile's final rows: out in O's dtype, the lse."""
    heads64 = heads.to(tl.int64)
    o_rows = heads64 * stride_oh + pos * stride_os
    tl.store(O + o_rows[:, None] + offs_dv[None, :] * stride_od, out.to(O.dtype.element_ty), mask=mask)
    tl.store(LSE + heads64 * stride_lh + pos, lse, mask=row_ok)


@features("VARLEN", "HAS_SINKS")
@triton.jit
def _attn_combine_kernel(O_PART, LSE_PART, O, LSE, SPLITS, CU_Q, SINKS, n_seqs, n_heads, seqlen_q, part_rows,
                         stride_ob, stride_oh, stride_os, stride_od, stride_lb, stride_lh,
                         HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
                         BLOCK_Q: tl.constexpr, VARLEN: tl.constexpr, HAS_SINKS: tl.constexpr,
                         INVARIANT: tl.constexpr):
    """Sequence b = program_id(0), query head h = program_id(1), if it was split: lse = log sum_s exp(lse_s),
    out = sum_s exp(lse_s - lse) out_s, in fp32 and in split order (merge_attention's formula), exp(sink) of the
    head joining the sum as a split whose output is 0; rows empty everywhere get out 0, lse -inf. INVARIANT: the
    same sum as the batch-invariant forward's left fold, one split after another (_merge_partial)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    q0, _, seqlen_q, _ = _serving_sequence(CU_Q, None, None, b, seqlen_q, 0, VARLEN, False, False)
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
    sink = _sink(SINKS, h, 1.4426950408889634, HAS_SINKS)  # in natural-log units
    if INVARIANT:
        out = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        lse = tl.full([BLOCK_M], float("-inf"), tl.float32)
        for s in range(n_split):
            out, lse = _merge_partial(out, lse,
                                      tl.load(O_PART + (s * step + part)[:, None] * HEAD_DIM_V + offs_dv[None, :],
                                              mask=m_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0),
                                      tl.load(LSE_PART + s * step + part, mask=m_ok, other=float("-inf")))
        if HAS_SINKS:
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
        if HAS_SINKS:
            l_i += tl.exp(sink - m_sub)
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), m_sub + tl.log(tl.where(empty, 1.0, l_i)))
    row = b64 * stride_ob + h.to(tl.int64) * stride_oh + (q0 + pos) * stride_os
    tl.store(O + row[:, None] + offs_dv[None, :] * stride_od, out.to(O.dtype.element_ty),
             mask=m_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
    tl.store(LSE + b64 * stride_lb + h * stride_lh + q0 + pos, lse, mask=m_ok)


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
    return (torch.empty(splits, n_seqs * part_rows, heads_q, Dv, device=device, dtype=f32),
            torch.empty(splits, n_seqs * part_rows, heads_q, device=device, dtype=f32),
            torch.empty(n_seqs, device=device, dtype=torch.int32))


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
    if n_seqs == 0 or seqlen_q == 0 or q.shape[2] == 0:
        return []
    if plan is None:
        plan = decode_plan(Hq, Hkv, D, Dv, q.dtype, q.device, n_seqs, seqlen_q, max_seqlen_k, num_splits,
                           None if packed is None else q.shape[2], cc, split_keys=split_keys)
    splits, combine = plan.splits, plan.splits > 1
    o_part, lse_part, split_counts = plan.scratch
    bd, bdv = head_block(D), head_block(Dv)
    paged = block_table is not None
    batch0 = (lambda t: (0, *t.stride()[1:])) if packed is not None else (lambda t: tuple(t.stride()))
    kv_strides = (lambda t: tuple(t.stride())) if paged else batch0
    kwargs = dict(HEAD_DIM=D, HEAD_DIM_V=Dv, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_Q=plan.block_q,
                  BLOCK_D=bd, BLOCK_DV=bdv, PACK=plan.pack, FP32_DOT=fp32_dot(q.dtype), COMBINE=combine,
                  PAGE_SIZE=page_size if paged else 0, num_warps=plan.warps, num_stages=plan.stages)
    (slopes, _), slope_strides, (cap_in, cap_out, *_) = modifier_args(mods, scale)
    sinks = None if mods is None else mods.sinks
    k_descale, v_descale = (None, None) if mods is None else (mods.k_descale, mods.v_descale)
    if mods is not None and mods.q_descale is not None:
        raise ValueError("the split-KV kernels take FP8 caches with 16/32-bit queries, not FP8 queries")
    descale_strides = (0, 0) if k_descale is None else k_descale.stride()
    lse_strides = batch0(lse)[:2]
    part_rows = plan.part_rows
    n_main = n_seqs * plan.tiles if packed is None else q.shape[2] // plan.block_q + n_seqs
    launch_list = [(_attn_fwd_split_kernel, (n_main + (n_seqs * (splits - 1) if combine else 0), Hq // plan.pack),
                    (q, k, v, out, lse, o_part, lse_part, split_counts, cu_q, cu_k, seqlens_k, block_table, slopes,
                     sinks, k_descale, v_descale, *batch0(q), *kv_strides(k), *kv_strides(v), *batch0(out),
                     *lse_strides, block_table.stride(0) if paged else 0, *slope_strides,
                     *descale_strides, n_main, n_seqs, plan.tiles, splits, plan.min_tiles, part_rows, Hq, group,
                     seqlen_q, max_seqlen_k, left, right, scale * LOG2E, cap_in, cap_out, plan.split_keys), kwargs)]
    if combine:
        launch_list.append((_attn_combine_kernel, (n_seqs, Hq),
                            (o_part, lse_part, out, lse, split_counts, cu_q, sinks, n_seqs, Hq, seqlen_q, part_rows,
                             *batch0(out), *lse_strides),
                            dict(HEAD_DIM_V=Dv, BLOCK_M=next_power_of_2(part_rows), BLOCK_DV=bdv,
                                 BLOCK_Q=plan.block_q, INVARIANT=plan.split_keys > 0)))
    return launch_list


def attention_decode(q, k, v, out, lse, seqlens_k, block_table, page_size: int, max_seqlen_k: int, scale: float,
                     left: int, right: int, num_splits: int = 0, mods=None, packed=None, plan=None,
                     split_keys: int = 0):
    """Launch split-KV attention (decode_launches) and count it as "decode"; writes out and lse."""
    run(decode_launches(q, k, v, out, lse, seqlens_k, block_table, page_size, max_seqlen_k, scale, left, right,
                        num_splits, mods=mods, packed=packed, plan=plan, split_keys=split_keys), "decode")
    return out, lse
