"""Split-KV decoding (flash-decoding): the visible keys of each query tile are cut into num_splits ranges, one
program each, running the forward's inner loop (`_attn_fwd_inner`) over its range of a contiguous or paged KV
cache; a combine kernel merges the partial outputs by their log-sum-exps in fp32 (deterministic, no atomics).

GQA packing: for few query rows the `pack` query heads of one kv group share a program, their rows stacked into
one tile (row r: head h0 + r // Sq, position r % Sq), so each K/V tile is read once per group.
"""
import math

import torch
import triton
import triton.language as tl

from .common import _block_range, _slope
from .configs import capability, head_block, head_chunks, interpreter_active, smem_limit
from .forward import _attn_fwd_inner
from .launch import LOG2E, features, fp32_dot, modifier_args, run


@triton.jit
def _clamp(x, lo, hi):
    return tl.minimum(tl.maximum(x, lo), hi)


@features("HAS_LEFT", "HAS_RIGHT", "PAGED", "HAS_SEQLENS", "SOFTCAP", "ALIBI")
@triton.jit
def _attn_fwd_split_kernel(Q, K, V, O, LSE, SEQLENS_K, PAGES, SLOPES,
                           stride_qb, stride_qh, stride_qs, stride_qd,
                           stride_kb, stride_kh, stride_ks, stride_kd,
                           stride_vb, stride_vh, stride_vs, stride_vd,
                           stride_os, stride_ob, stride_oh, stride_om, stride_od,
                           stride_ls, stride_lb, stride_lh,
                           stride_pb, page_size, stride_ab, stride_ah, head_start,
                           n_heads, group, seqlen_q, seqlen_k, left, right, qk_scale, cap_in, cap_out,
                           HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PACK: tl.constexpr,
                           HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, FP32_DOT: tl.constexpr,
                           PAGED: tl.constexpr, HAS_SEQLENS: tl.constexpr, SOFTCAP: tl.constexpr,
                           ALIBI: tl.constexpr):
    """One (query tile, batch * query-head group, split): partial out (fp32, or the output dtype when there is one
    split) and lse of the split's key range. K, V: contiguous (B, Hkv, S, D)-indexed, or paged (pages, Hkv,
    page_size, D)-indexed with PAGES the (B, max_pages) block table."""
    start_m = tl.program_id(0) * BLOCK_M
    bg = tl.program_id(1) + head_start
    split = tl.program_id(2)
    n_splits = tl.num_programs(2)
    b = bg // (n_heads // PACK)
    h0 = bg % (n_heads // PACK) * PACK
    hk = h0 // group
    if HAS_SEQLENS:  # this row's keys: its cached length (plus the appended ones, counted by the launcher)
        seqlen_k = tl.load(SEQLENS_K + b)
    offset = seqlen_k - seqlen_q  # bottom-right per batch row
    b64, hk64 = b.to(tl.int64), hk.to(tl.int64)

    # Row r of the tile: query head h0 + r // Sq at position r % Sq (PACK = 1: head h0, position r).
    rows = start_m + tl.arange(0, BLOCK_M)
    heads = h0 + rows // seqlen_q
    pos = rows % seqlen_q
    row_ok = rows < PACK * seqlen_q
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = (Q + b64 * stride_qb + heads.to(tl.int64)[:, None] * stride_qh + pos[:, None] * stride_qs
              + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)

    if PAGED:
        Kh = K + hk64 * stride_kh
        Vh = V + hk64 * stride_vh
        PAGES += b64 * stride_pb
    else:
        Kh = K + b64 * stride_kb + hk64 * stride_kh
        Vh = V + b64 * stride_vb + hk64 * stride_vh

    # Key tiles the tile's positions see ([0, Sq) when heads are packed: one tile holds every position).
    pos_start = start_m if PACK == 1 else 0
    lo, full_lo, full_hi, hi = _block_range(pos_start, seqlen_q, seqlen_k, offset, left, right,
                                            BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    per_split = tl.cdiv((hi - lo) // BLOCK_N, n_splits) * BLOCK_N
    s_lo = tl.minimum(lo + split * per_split, hi)
    s_hi = tl.minimum(s_lo + per_split, hi)
    slope = _slope(SLOPES, b, heads, stride_ab, stride_ah, qk_scale, ALIBI)  # one per row: heads are packed
    if ALIBI:
        slope = slope[:, None]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for seg in tl.static_range(3):  # masked edge, unmasked middle, masked edge -- within this split's range
        seg_lo = s_lo if seg == 0 else _clamp(full_lo if seg == 1 else full_hi, s_lo, s_hi)
        seg_hi = _clamp(full_lo, s_lo, s_hi) if seg == 0 else (_clamp(full_hi, s_lo, s_hi) if seg == 1 else s_hi)
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, Kh, Vh, b, hk, stride_ks, stride_kd, stride_vs, stride_vd,
                                        pos, seg_lo, seg_hi, seqlen_q, seqlen_k, offset, left, right, qk_scale,
                                        HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV,
                                        HAS_LEFT, HAS_RIGHT, seg != 1, FP32_DOT, False,
                                        PAGES, page_size, stride_kb, stride_vb, PAGED,
                                        cap_in, cap_out, slope, SOFTCAP, ALIBI, 0, 0, 0, 0, False,
                                        None, None, 0, None, 1, 1, False, heads, None, None, False, (), None,
                                        ())

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = (tl.where(empty, 0.0, m_i) * qk_scale + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453
    lse = tl.where(empty, float("-inf"), lse)
    heads64 = heads.to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV)
    o_ptrs = (O + split * stride_os + b64 * stride_ob + heads64[:, None] * stride_oh + pos[:, None] * stride_om
              + offs_dv[None, :] * stride_od)
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
    tl.store(LSE + split * stride_ls + b64 * stride_lb + heads64 * stride_lh + pos, lse, mask=row_ok)


@features("HAS_SINKS")
@triton.jit
def _attn_combine_kernel(O_PART, LSE_PART, O, LSE, SINKS, head_start, n_splits, n_heads, seqlen_q, stride_ps,
                         stride_ls, stride_ob, stride_oh, stride_om, stride_od,
                         HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
                         HAS_SINKS: tl.constexpr):
    """lse = log sum_s exp(lse_s), out = sum_s exp(lse_s - lse) out_s, in fp32 and in split order (merge_attention's
    formula); rows empty in every split get out 0, lse -inf. With sinks, exp(sink) of the row's head joins the
    sum (and so lse), as a split whose output is 0. Partials: out (n_splits, B, Hq, Sq, Dv) and lse
    (n_splits, B, Hq, Sq), contiguous within a split; lse (B, Hq, Sq) contiguous, out any strides."""
    bh = tl.program_id(1) + head_start
    sink = tl.full([], float("-inf"), tl.float32)
    if HAS_SINKS:
        sink = tl.load(SINKS + bh % n_heads)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < seqlen_q
    row = bh.to(tl.int64) * seqlen_q + offs_m  # (b, h, m) flattened
    m = tl.maximum(tl.full([BLOCK_M], float("-inf"), tl.float32), sink)
    for s in range(n_splits):
        m = tl.maximum(m, tl.load(LSE_PART + s * stride_ls + row, mask=m_ok, other=float("-inf")))
    m_sub = tl.where(m == float("-inf"), 0.0, m)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for s in range(n_splits):
        w = tl.exp(tl.load(LSE_PART + s * stride_ls + row, mask=m_ok, other=float("-inf")) - m_sub)
        o = tl.load(O_PART + s * stride_ps + row[:, None] * HEAD_DIM_V + offs_dv[None, :],
                    mask=m_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
        acc += w[:, None] * o
        l_i += w
    if HAS_SINKS:
        l_i += tl.exp(sink - m_sub)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
    tl.store(LSE + row, tl.where(empty, float("-inf"), m_sub + tl.log(tl.where(empty, 1.0, l_i))), mask=m_ok)


# Tiles: decode is memory-bound, so small query tiles (all of a kv group's rows, up to PACK_ROWS) and 64 keys.
PACK_ROWS = 128
INTERPRETER_BLOCK_N = 32


def pack_heads(group: int, seqlen_q: int) -> int:
    """Query heads per program: the whole kv group where its rows fit one tile, else 1."""
    return group if 1 < group and group * seqlen_q <= PACK_ROWS else 1


def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device; 8 under the interpreter (so the CPU takes the same paths)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def split_count(num_splits: int, programs: int, key_tiles: int, device) -> int:
    """num_splits, or (0) enough splits for about two programs per SM, at most one per key tile and 64."""
    if num_splits > 0:
        return num_splits
    return max(1, min(64, key_tiles, math.ceil(2 * sm_count(device) / max(programs, 1))))


def wants_split(batch: int, heads_q: int, seqlen_q: int, seqlen_k: int, device) -> bool:
    """Whether the dense forward should take the split-KV path: few query rows (decode steps, Sq <= 16), so its grid
    of (batch * heads) programs would leave SMs idle, and keys for several tiles to split."""
    block_n = INTERPRETER_BLOCK_N if interpreter_active() else 64
    return seqlen_q <= 16 and batch * heads_q < sm_count(device) and seqlen_k >= 4 * block_n


def decode_launches(q, k, v, out, lse, seqlens_k, block_table, page_size: int, max_seqlen_k: int, scale: float,
                    left: int, right: int, num_splits: int = 0, cc=None, mods=None):
    """The split-KV launches as (kernel, grid, args, kwargs), and the scratch they need allocated.

    q, out: (B, Hq, Sq, D / Dv)-indexed views; lse (B, Hq, Sq) float32 contiguous. k, v: (B, Hkv, S, D)-indexed
    views of a contiguous cache, or, with block_table (B, max_pages) int32, (pages, Hkv, page_size, D)-indexed
    views of a paged one. seqlens_k: int32 (B,) keys per row (None: max_seqlen_k for every row). mods: a
    forward.Modifiers with softcap / ALiBi / sinks (no dropout: inference only); sinks join in the combine kernel,
    which then runs even for one split."""
    B, Hq, Sq, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    group = Hq // Hkv
    pack = pack_heads(group, Sq)
    block_m = max(16, triton.next_power_of_2(pack * Sq)) if pack > 1 else min(64, max(16, triton.next_power_of_2(Sq)))
    block_n = INTERPRETER_BLOCK_N if interpreter_active() else 64
    grid0 = triton.cdiv(pack * Sq, block_m)
    splits = split_count(num_splits, grid0 * B * Hq // pack, triton.cdiv(max_seqlen_k, block_n), q.device)
    sinks = None if mods is None else mods.sinks
    if splits == 1 and sinks is None:  # straight into out and lse (the combine adds the sinks)
        o, o_lse = out, lse
        o_strides, l_strides = (0, *out.stride()), (0, *lse.stride()[:2])
    else:
        o = torch.empty(splits, B, Hq, Sq, Dv, device=q.device, dtype=torch.float32)
        o_lse = torch.empty(splits, B, Hq, Sq, device=q.device, dtype=torch.float32)
        o_strides, l_strides = o.stride(), o_lse.stride()[:3]
    paged = block_table is not None
    cc = capability(q.device) if cc is None and q.device.type != "meta" else cc
    bd, bdv, size = head_block(D), head_block(Dv), q.element_size()
    # Triton keeps num_stages - 1 K / V tiles in shared memory: 2 where they fit (pipelined, by the compile-time
    # gate), keeping ~12% for the compiler's own buffers.
    room = 0 if cc is None else smem_limit(cc) * 7 // 8 - block_m * bd * size
    stages = 1 + max(0, min(2, room // (block_n * (bd + bdv) * size)))
    kwargs = dict(HEAD_DIM=D, HEAD_DIM_V=Dv, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=bd, BLOCK_DV=bdv, PACK=pack,
                  FP32_DOT=fp32_dot(q.dtype), num_warps=4, num_stages=stages)
    (slopes, _), slope_strides, (cap_in, cap_out, *_) = modifier_args(mods, scale)
    launch_list = [(_attn_fwd_split_kernel, (grid0, count, splits),
                    (q, k, v, o, o_lse, seqlens_k, block_table, slopes, *q.stride(), *k.stride(), *v.stride(),
                     *o_strides, *l_strides, block_table.stride(0) if paged else 0, page_size if paged else 0,
                     *slope_strides, start, Hq, group, Sq, max_seqlen_k, left, right, scale * LOG2E, cap_in, cap_out),
                    kwargs)
                   for start, count in head_chunks(B * Hq // pack)]
    if o is not out:
        block = min(64, max(16, triton.next_power_of_2(Sq)))
        launch_list += [(_attn_combine_kernel, (triton.cdiv(Sq, block), count),
                         (o, o_lse, out, lse, sinks, start, splits, Hq, Sq, o.stride(0), o_lse.stride(0),
                          *out.stride()),
                         dict(HEAD_DIM_V=Dv, BLOCK_M=block, BLOCK_DV=head_block(Dv)))
                        for start, count in head_chunks(B * Hq)]
    return launch_list


def attention_decode(q, k, v, out, lse, seqlens_k, block_table, page_size: int, max_seqlen_k: int, scale: float,
                     left: int, right: int, num_splits: int = 0, mods=None):
    """Launch split-KV attention (decode_launches) and count it as "decode"; writes out and lse."""
    run(decode_launches(q, k, v, out, lse, seqlens_k, block_table, page_size, max_seqlen_k, scale, left, right,
                        num_splits, mods=mods), "decode")
    return out, lse
