"""Ring attention: every rank keeps its query shard and the K/V shards travel around the ring of the process group;
each step attends to one K/V shard with the dense kernels and merges the partial result by its log-sum-exp
(fused_attn.merge_attention). The backward sends the K/V shards around again, each followed by the fp32 dK/dV
accumulated for it, which ends on the rank that owns the shard.

The mask is `attention`'s on the whole sequence (there Sq = Sk, so query position p sees key position t iff
p - left <= t <= p + right). A step's kernel calls are planned from the shards' positions: a block of the mask
that is entirely visible runs unmasked, one that nothing sees is not launched, and a step nothing on any rank
needs (keys beyond every window) ends the ring early, sending nothing more.
"""
import dataclasses
import functools
from typing import NamedTuple

import torch

from .. import ops
from ..kernels.launch import LOG2E
from ..merge import merge_attention
from ._group import agree, check_shards, exchange, rank_and_size
from .sharding import segments

EMPTY, PARTIAL, FULL = 0, 1, 2


def _band(m: int, n: int, offset: int, left: int, right: int) -> int:
    """How much of an m x n block the band  i + offset - left <= j <= i + offset + right  covers (-1: unbounded)."""
    first = 0 if right < 0 else max(0, -offset - right)  # rows seeing a column >= 0 ...
    last = m - 1 if left < 0 else min(m - 1, n - 1 - offset + left)  # ... and a column < n
    if first > last:
        return EMPTY
    if (left < 0 or m - 1 + offset - left <= 0) and (right < 0 or offset + right >= n - 1):
        return FULL
    return PARTIAL


class Run(NamedTuple):
    start: int  # global position of the first element
    local: int  # its index in the shard
    length: int


class Call(NamedTuple):
    """One kernel call: local query rows [q0, q1) against local keys [k0, k1) with the diagonal offset and window."""
    q0: int
    q1: int
    k0: int
    k1: int
    offset: int
    left: int
    right: int


def _call(qs, ks, left: int, right: int, exact: bool):
    """One call over adjacent query runs x adjacent key runs, if one band expresses the global mask on all of them
    (exact: with every run pair's own diagonal offset, as ALiBi's distances need): None if nothing there is
    visible, False if no single call can, else the Call. Entirely visible blocks run without the mask."""
    pairs = [(q, k, _band(q.length, k.length, q.start - k.start, left, right)) for q in qs for k in ks]
    q0, q1, k0, k1 = qs[0].local, qs[-1].local + qs[-1].length, ks[0].local, ks[-1].local + ks[-1].length
    if all(c == EMPTY for *_, c in pairs):
        return None
    q, k, _ = next(p for p in pairs if p[2] != EMPTY)
    offset = q.start - k.start - (q.local - q0) + (k.local - k0)
    unmasked = all(c == FULL for *_, c in pairs)
    window = (-1, -1) if unmasked else (left, right)
    for q, k, c in pairs:  # each run pair must see under the call's band what it sees globally
        local = offset + (q.local - q0) - (k.local - k0)
        if local != q.start - k.start and (exact or c == PARTIAL or _band(q.length, k.length, local, *window) != c):
            return False
    return Call(q0, q1, k0, k1, 0 if unmasked and not exact else offset, *window)


def _plan(qs, ks, left: int, right: int, exact: bool):
    """The fewest calls covering query runs qs x key runs ks: the whole block, split by query runs, by key runs, or
    both (always possible)."""
    options = []
    for q_groups in ((qs,), tuple((q,) for q in qs)):
        for k_groups in ((ks,), tuple((k,) for k in ks)):
            calls = [_call(a, b, left, right, exact) for a in q_groups for b in k_groups]
            if not any(c is False for c in calls):
                options.append(tuple(c for c in calls if c is not None))
    return min(options, key=len)


@functools.lru_cache(maxsize=64)
def schedule(rank: int, world: int, length: int, zigzag: bool, left: int, right: int, exact: bool = False):
    """(calls of each step 0..last for `rank`, last): at step s a rank holds the K/V shard of rank (rank - s) mod W;
    `last` is the last step any rank has work in (the ring stops there). exact: every call keeps the global
    diagonal offset (ALiBi)."""
    runs = [tuple(Run(*r) for r in segments(r, world, length, zigzag)) for r in range(world)]
    plans = [[_plan(runs[r], runs[(r - s) % world], left, right, exact) for s in range(world)] for r in range(world)]
    last = max((s for plan in plans for s in range(world) if plan[s]), default=0)
    return tuple(plans[rank][:last + 1]), last


def _pack(*ts):
    return torch.cat([t.reshape(-1) for t in ts])


def _unpack(buf, *shapes):
    out, at = [], 0
    for shape in shapes:
        n = shape.numel()
        out.append(buf[at:at + n].view(shape))
        at += n
    return out


def _merge_stats(acc, part, qk_scale: float):
    """The kernels' per-row softmax stats (m: the row max of the scores in the kernels' unit, log2 l: of the
    denominator; empty rows (0, inf)) of two disjoint key sets merged into those of their union, in fp32:
    m = max(m_a, m_b), l = l_a 2^((m_a - m) qk_scale) + l_b 2^((m_b - m) qk_scale). Carrying the row max keeps the
    backward's P = exp2((s - m) qk_scale - log2 l) free of the cancellation that P = exp(scale s - lse) suffers at
    large logits."""
    m_a, m_b = acc[..., 0], part[..., 0]
    l_a, l_b = (torch.where(torch.isinf(t[..., 1]), float("-inf"), t[..., 1]) for t in (acc, part))  # log2 of 0
    m = torch.where(torch.isinf(l_a), m_b, torch.where(torch.isinf(l_b), m_a, torch.maximum(m_a, m_b)))
    log2_l = torch.logaddexp2((m_a - m) * qk_scale + l_a, (m_b - m) * qk_scale + l_b)
    empty = torch.isinf(log2_l)
    return torch.stack([torch.where(empty, 0.0, m), torch.where(empty, float("inf"), log2_l)], dim=-1)


def _step(call: ops.Call, c: Call) -> ops.Call:
    """The ops' Call of one planned kernel call c (its diagonal offset and window; (B, H, S, D) "bhsd" views)."""
    return dataclasses.replace(call, offset=c.offset, left=c.left, right=c.right, layout="bhsd")


def _ring_forward(q, k, v, call, plan, last, group, rank, world):
    B, H, S, Dv = *q.shape[:3], v.shape[-1]
    acc = q.new_zeros((B, S, H, Dv) if call.layout == "bshd" else (B, H, S, Dv), dtype=torch.float32)
    acc = acc.transpose(1, 2) if call.layout == "bshd" else acc  # out in the layout's memory order, like attention's
    lse = q.new_full((B, H, S), float("-inf"), dtype=torch.float32)
    stats = torch.stack([torch.zeros_like(lse), torch.full_like(lse, float("inf"))], dim=-1)  # (m, log2 l): empty
    kv = _pack(k, v)
    nxt, prev = (rank + 1) % world, (rank - 1) % world
    for step, calls in enumerate(plan):
        pending = exchange(kv, group, nxt, prev, "kv") if step < last else None  # the next shard, meanwhile
        ks, vs = _unpack(kv, k.shape, v.shape)
        for c in calls:
            part, part_lse, part_stats, _ = ops.attention_forward(q[:, :, c.q0:c.q1], ks[:, :, c.k0:c.k1],
                                                                  vs[:, :, c.k0:c.k1], _step(call, c))
            rows = slice(c.q0, c.q1)
            acc[:, :, rows], lse[:, :, rows] = merge_attention([acc[:, :, rows], part.float()],
                                                               [lse[:, :, rows], part_lse])
            stats[:, :, rows] = _merge_stats(stats[:, :, rows], part_stats, call.scale * LOG2E)
        if pending is not None:
            kv = pending.wait()
    return acc.to(q.dtype), lse, stats


def _ring_backward(dout, q, k, v, out, stats, call, plan, last, group, rank, world):
    # the merged stats (_merge_stats); the backward kernels read them contiguous: one copy per row range used
    stats = {(c.q0, c.q1): stats[:, :, c.q0:c.q1].contiguous() for calls in plan for c in calls}
    dq = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    kv = _pack(k, v)
    nxt, prev = (rank + 1) % world, (rank - 1) % world
    incoming = None  # the dK/dV so far of the shard held at this step, from the rank that held it one step ago
    for step, calls in enumerate(plan):
        pending = exchange(kv, group, nxt, prev, "kv") if step < last else None
        ks, vs = _unpack(kv, k.shape, v.shape)
        contrib = torch.zeros(kv.shape, device=kv.device, dtype=torch.float32)
        dks, dvs = _unpack(contrib, k.shape, v.shape)
        for c in calls:
            rows, cols = slice(c.q0, c.q1), slice(c.k0, c.k1)
            g_q, g_k, g_v, *_ = ops.attention_backward(dout[:, :, rows], q[:, :, rows], ks[:, :, cols],
                                                      vs[:, :, cols], out[:, :, rows], stats[c.q0, c.q1], None,
                                                      _step(call, c))
            dq[:, :, rows] += g_q.float()
            dks[:, :, cols] += g_k.float()
            dvs[:, :, cols] += g_v.float()
        dkv = contrib if incoming is None else incoming.wait() + contrib
        if pending is not None:
            incoming = exchange(dkv, group, nxt, prev, "dkv")
            kv = pending.wait()
    if last > 0:  # the shard's owner is `last` ranks back
        dkv = exchange(dkv, group, (rank - last) % world, (rank + last) % world, "dkv home").wait()
    dk, dv = _unpack(dkv, k.shape, v.shape)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class RingAttentionFunction(torch.autograd.Function):
    """(B, H, S_shard, D)-indexed views of this rank's q, k, v shards and the ops.Call of the whole sequence's
    attention -> this rank's out (laid out as call.layout) and lse; the backward gives this rank's dq, dk, dv."""

    @staticmethod
    def forward(ctx, q, k, v, call: ops.Call, zigzag: bool, group):
        rank, world = rank_and_size(group)
        exact = call.mods.alibi_slopes is not None
        plan, last = schedule(rank, world, q.shape[2], zigzag, call.left, call.right, exact)
        args = (plan, last, group, rank, world)
        out, lse, stats = _ring_forward(q, k, v, call, *args)
        ctx.save_for_backward(q, k, v, out, stats)
        ctx.args = (call, *args)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, stats = ctx.saved_tensors
        dq, dk, dv = _ring_backward(dout, q, k, v, out, stats, *ctx.args)
        return dq, dk, dv, None, None, None


def ring_attention(q, k, v, *, causal=False, window_size=(-1, -1), scale=None, group=None, layout="bhsd",
                   zigzag=False, return_lse=False, softcap=0.0, alibi_slopes=None):
    """Attention over a sequence sharded across the ranks of `group` (context parallelism), equal to
    `fused_attn.attention` on the whole sequence.

    Every rank passes its own shard of q, k and v along the sequence, all ranks the same shard length S_shard:

        q (B, Hq, S_shard, D), k (B, Hkv, S_shard, D), v (B, Hkv, S_shard, Dv) for layout "bhsd",
        (B, S_shard, H, D) for "bshd"; Hq % Hkv == 0 (GQA: only the Hkv heads travel).

    zigzag=False: rank r holds positions [r * S_shard, (r + 1) * S_shard) of the W * S_shard; zigzag=True: the two
    halves of chunks r and 2W - 1 - r of 2W (`shard_sequence`), which evens out the causal work across ranks.

    causal, window_size, scale: as in `attention` on the whole sequence (Sq = Sk there, so position p sees t iff
    p - left <= t <= p + right). Kernel calls nothing sees are not launched, and the ring stops after the last step
    any rank needs: with a window shorter than a shard, ranks exchange only their neighbours' K/V.
    softcap, alibi_slopes: as in `attention` (ALiBi's distance on the whole sequence; the same slopes on every
    rank). No dropout (its random stream is per call, not per sequence position across ranks).

    Returns this rank's out shard (same layout) and, with return_lse, its lse (B, Hq, S_shard) float32.
    Autograd gives this rank's dq, dk, dv. Results are deterministic (a fixed order of merges and sums). Argument
    errors, and shapes, dtypes or flags that differ between ranks, raise ValueError / TypeError on every rank.
    Runs on any torch.distributed backend with point-to-point ops (NCCL on GPUs, gloo on CPUs).
    """
    rank, world = rank_and_size(group)
    checked = {}

    def check():
        a, mods, facts = checked["args"] = check_shards(q, k, v, causal=causal, window_size=window_size, scale=scale,
                                                         layout=layout, softcap=softcap, alibi_slopes=alibi_slopes)
        if not isinstance(zigzag, bool):
            raise TypeError(f"zigzag must be a bool, got {zigzag!r}")
        if zigzag and a.q.shape[2] % 2:
            raise ValueError(f"zigzag shards hold two equal chunks, got shards of odd length {a.q.shape[2]}")
        return dict(facts, zigzag=zigzag)
    agree(group, "ring_attention", check)
    a, mods, _ = checked["args"]
    out, lse = RingAttentionFunction.apply(a.q, a.k, a.v, ops.Call.of(a, mods), zigzag, group)
    if layout == "bshd":
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out
