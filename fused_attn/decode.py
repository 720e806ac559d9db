"""Decoding: attention_with_kvcache, the split-KV kernels over a contiguous or paged KV cache, and write_kv_cache."""
import dataclasses

import torch

from . import ops
from ._args import (FP8_DTYPES, check_args, check_descales, check_kernel_inputs, check_kvcache, check_kvcache_values,
                    check_modifiers, check_rotary, check_write_kv, reads_values)
from .ops import Call
from .replay import key_of
from .schedule import check_metadata, replayable


def _append(k_cache, v_cache, k, v, cache_seqlens, block_table, page, rows=None, descales=(None, None)):
    """cache[rows[b], cache_seqlens[b] + i] = new[b, i] in place for k and v (rows: cache_batch_idx, default b;
    through the block table when paged), by write_kv_cache's kernel, quantized with row b's descales (B, Hkv) to an
    FP8 cache; no sync."""
    B, S_new = k.shape[:2]
    pos = cache_seqlens[:, None].long() + torch.arange(S_new, device=k.device)
    if block_table is None:  # a contiguous cache is a paged one whose page b is row b
        first = (torch.arange(B, device=k.device) if rows is None else rows.long())[:, None] * k_cache.shape[1]
        slots = first + pos
    else:
        slots = block_table.gather(1, pos // page).long() * page + pos % page
    per_token = (lambda d: None if d is None else d[:, None].expand(-1, S_new, -1).flatten(0, 1))
    ops.write_kv(k.flatten(0, 1), v.flatten(0, 1), k_cache, v_cache, slots.flatten(), *map(per_token, descales))


def write_kv_cache(key, value, k_cache, v_cache, slot_mapping, *, k_scale=None, v_scale=None):
    """Write new keys and values into a paged KV cache in place (vLLM's reshape_and_cache_flash), one Triton kernel
    for any page size.

    Args:
        key: (num_tokens, Hkv, D), value: (num_tokens, Hkv, Dv), float16 / bfloat16 / float32.
        k_cache, v_cache: (num_pages, page_size, Hkv, D / Dv) in key's dtype, or FP8 (torch.float8_e4m3fn /
            float8_e5m2): then each value is stored as x / scale, clamped to the type's finite range and rounded to
            nearest (ties to even), with k_scale / v_scale float32 tensors of one value or one per kv head (Hkv,)
            -- attention then takes k_descale = k_scale (expanded to (B, Hkv)).
        slot_mapping: int64 (or int32) (num_tokens,): token t goes to slot s = page * page_size + offset, i.e.
            k_cache[s // page_size, s % page_size]; -1 marks a padding token, which writes nothing.

    Nothing else in the caches changes. Checked: shapes, dtypes, devices; the slot values only on CPU tensors
    (reading them from a GPU would synchronize it).
    """
    check_write_kv(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    with torch.no_grad():
        ops.write_kv(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def rotary(x, cos, sin, positions, interleaved: bool):
    """x (B, S, H, D) with its first rotary_dim = 2 * cos.shape[1] dims rotated by the angles of rows `positions`
    (B, S) of cos / sin (seqlen_ro, rotary_dim / 2), in float32: pairs (2i, 2i + 1) if interleaved (GPT-J), else
    (i, i + rotary_dim / 2) (GPT-NeoX); the other dims as they are (FlashAttention's apply_rotary_emb)."""
    rd = 2 * cos.shape[1]
    c, s = (t[positions][:, :, None].float() for t in (cos, sin))
    head = x[..., :rd].float()
    if interleaved:
        x1, x2 = head[..., 0::2], head[..., 1::2]
        head = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], -1).flatten(-2)
    else:
        x1, x2 = head.chunk(2, -1)
        head = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], -1)
    return torch.cat([head.to(x.dtype), x[..., rd:]], -1)


def _row_pages(k_cache, v_cache, rows, start):
    """A contiguous cache read through rows and left padding as pages of one key: the (B, S) int32 table naming,
    for batch row b, cache row rows[b]'s keys start[b], start[b] + 1, ... (the last ones clamped in; the lengths
    stop before them), and the caches viewed as (rows * S, Hkv, 1, D) pages."""
    S = k_cache.shape[1]
    j = torch.arange(S, device=k_cache.device)
    table = (rows[:, None] * S + (start[:, None] + j).clamp(max=S - 1)).to(torch.int32)
    pages = (lambda c: c.reshape(-1, 1, *c.shape[2:]).transpose(1, 2))
    return table, pages(k_cache), pages(v_cache)


def attention_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens=None, block_table=None,
                           causal=False, window_size=(-1, -1), scale=None, num_splits=0, return_lse=False, softcap=0.0,
                           alibi_slopes=None, sinks=None, rotary_cos=None, rotary_sin=None, rotary_interleaved=True,
                           cache_batch_idx=None, cache_leftpad=None, k_descale=None, v_descale=None,
                           scheduler_metadata=None):
    """Attention of new queries against a KV cache, optionally appending new keys and values to it first
    (FlashAttention-2's flash_attn_with_kvcache; inference only). Split-KV kernels: the keys of each row are cut
    into ranges run by separate programs and merged by their log-sum-exps (deterministic).

    Args:
        q: (B, Sq, Hq, D).
        k_cache, v_cache: (B, S_cache, Hkv, D / Dv) contiguous caches, or paged: (num_pages, page_size, Hkv, D / Dv)
            with block_table (B, max_pages) int32 naming each row's pages in order; page_size a multiple of 16.
        k, v: optional (B, S_new, Hkv, D / Dv): written into the cache in place at positions cache_seqlens[b] ..
            cache_seqlens[b] + S_new - 1 of row b (nothing else in the cache changes); attention then runs over
            cache_seqlens[b] + S_new keys.
        cache_seqlens: int or int32 (B,): the cached keys per row before this call (default: the whole cache);
            not modified.
        causal, window_size, scale: as in `attention`, bottom-right aligned per row: query i of row b sees key j
            iff  i + Sk_b - Sq - left <= j <= i + Sk_b - Sq + right,  Sk_b = cache_seqlens[b] + S_new  (so causal
            with Sq > 1 -- speculative decoding, chunked prefill -- is exact).
        num_splits: key ranges per query tile; 1: none; 0 picks from the batch, heads, cache length and SM count:
            none where the batch's (query tile, kv head) programs already fill the GPU's SMs, else enough for about
            two waves, each range at least 4 key tiles of the longest row, at most 32.
        return_lse: also return the log-sum-exp (B, Hq, Sq) float32.
        softcap, alibi_slopes: as in `attention` (ALiBi's distance |i + Sk_b - Sq - j| per row).
        sinks: as in `attention` (float32 (Hq,)): their terms join in the split-KV combine kernel.
        rotary_cos, rotary_sin: (seqlen_ro, rotary_dim / 2) in q's dtype (FlashAttention-2's): the new keys are
            rotated at positions cache_seqlens[b] + i before they are written, and q at the same positions if causal
            or windowed, else all at cache_seqlens[b]; rotary_interleaved: pairs (2i, 2i + 1) (GPT-J) or halves
            (GPT-NeoX). Needs k and v.
        cache_batch_idx: int32 (B,): batch row b reads and appends to cache row cache_batch_idx[b] (the cache may
            hold more rows); cache_leftpad: int32 (B,): row b's cache starts at that position (its keys are
            cache_leftpad[b] .. cache_seqlens[b] - 1, then the new ones; the mask aligns to that length). Both take
            contiguous caches (as in FlashAttention) and read them through a one-key-per-page table.
        k_descale, v_descale: for FP8 caches (torch.float8_e4m3fn / float8_e5m2; q float16 / bfloat16 / float32):
            float32 (B, Hkv) (or one value), row b's kv head h reading keys k_cache * k_descale[b, h] and values
            v_cache * v_descale[b, h] (FlashAttention-3's convention; the FP8 tiles are converted in registers, the
            descales multiply the scores and the output). New k / v (in q's dtype) are written quantized with the
            same factors, as write_kv_cache does. Output in q's dtype.
        scheduler_metadata: the step's plan from fused_attn.get_scheduler_metadata (made once, passed to every
            layer): the call checks its tensors against it and skips the per-call planning and value checks.

    Returns:
        out (B, Sq, Hq, Dv), or (out, lse). Rows that see no key get out 0, lse -inf.

    Checked everywhere: ranks, shapes, dtypes, devices, page size, Hq % Hkv, window, requires_grad. Checked only on
    CPU tensors (reading them from a GPU would synchronize it) and trusted on a GPU, as in FlashAttention:
    cache_seqlens + S_new <= the cache's capacity, and every block_table entry a row uses naming a page that exists.
    """
    out, lse = kvcache_call(q, k_cache, v_cache, k, v, cache_seqlens, block_table, causal, window_size, scale,
                            num_splits, softcap, alibi_slopes, sinks, rotary_cos, rotary_sin, rotary_interleaved,
                            cache_batch_idx, cache_leftpad, k_descale, v_descale, scheduler_metadata)
    return (out, lse) if return_lse else out


def kvcache_call(q, k_cache, v_cache, k, v, cache_seqlens, block_table, causal, window_size, scale, num_splits,
                 softcap, alibi_slopes, sinks, rotary_cos, rotary_sin, rotary_interleaved, cache_batch_idx,
                 cache_leftpad, k_descale, v_descale, scheduler_metadata):
    """attention_with_kvcache's arguments in order, positionally (the drop-in's lean path) -> (out, lse)."""
    meta = check_metadata(scheduler_metadata, "attention_with_kvcache")
    args = (q, k_cache, v_cache, k, v, cache_seqlens, block_table, causal, window_size, scale, num_splits, softcap,
            alibi_slopes, sinks, rotary_cos, rotary_sin, rotary_interleaved, cache_batch_idx, cache_leftpad,
            k_descale, v_descale, meta)
    if (k is None and rotary_cos is None and cache_batch_idx is None and cache_leftpad is None
            and replayable(meta, window_size)):
        # A step's per-layer call: the plan replays what the first such call launched (SchedulerMetadata.replays).
        key = key_of("kvcache", causal, *window_size, scale, num_splits, softcap)
        return meta.replays(key, (q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, sinks, k_descale,
                                  v_descale), _with_kvcache, args)
    return _with_kvcache(*args)


def _with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, block_table, causal, window_size, scale, num_splits,
                  softcap, alibi_slopes, sinks, rotary_cos, rotary_sin, rotary_interleaved, cache_batch_idx,
                  cache_leftpad, k_descale, v_descale, meta):
    """attention_with_kvcache's checked path: (out (B, Sq, Hq, Dv), lse)."""
    cache_seqlens, capacity, page = check_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, block_table, num_splits,
                                                  cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad)
    if meta is not None:
        meta.check("attention_with_kvcache", q, k_cache, q.shape[0], False, page)
    check_rotary(q, k, rotary_cos, rotary_sin)
    whole = block_table is None and cache_batch_idx is None
    fp8 = k_cache.dtype in FP8_DTYPES
    a = check_args(q, *(c if whole else c[:1].expand(q.shape[0], -1, -1, -1) for c in (k_cache, v_cache)),
                   causal=causal, window_size=window_size, scale=scale, layout="bshd", kv_fp8=fp8)
    s_new = 0 if k is None else k.shape[1]
    mods = check_modifiers(q.shape[0], q.shape[2], q.device, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks)
    descales = check_descales(dict(k_descale=k_descale, v_descale=v_descale), k_cache.dtype, q.shape[0],
                              k_cache.shape[2], q.device)
    mods = dataclasses.replace(mods, k_descale=descales[0], v_descale=descales[1])
    check_kernel_inputs(a)  # a.k, a.v: a row of a contiguous cache, or one page
    if meta is None and reads_values(cache_seqlens):  # a plan's lengths were checked when it was made
        check_kvcache_values(cache_seqlens, s_new, capacity, block_table, page, k_cache.shape[0], cache_batch_idx,
                             cache_leftpad, k_cache.shape[0])
    with torch.no_grad():
        if rotary_cos is not None:
            pos = cache_seqlens[:, None].long() + torch.arange(max(q.shape[1], s_new), device=q.device)
            moving = causal or tuple(window_size) != (-1, -1)
            q = rotary(q, rotary_cos, rotary_sin, pos[:, :q.shape[1]] if moving else pos[:, :1].expand(-1, q.shape[1]),
                       rotary_interleaved)
            k = rotary(k, rotary_cos, rotary_sin, pos[:, :s_new], rotary_interleaved)
            a = dataclasses.replace(a, q=q.transpose(1, 2))
        if k is not None:
            _append(k_cache, v_cache, k, v, cache_seqlens, block_table, page, cache_batch_idx, descales)
        kv = (lambda t: t.transpose(1, 2))  # (B, S, H, D) and (pages, page_size, H, D) alike
        seqlens_k = cache_seqlens + s_new if s_new else cache_seqlens
        table, keys, values = block_table, kv(k_cache), kv(v_cache)
        if cache_batch_idx is not None or cache_leftpad is not None:
            rows = torch.arange(q.shape[0], device=q.device) if cache_batch_idx is None else cache_batch_idx.long()
            start = torch.zeros_like(rows) if cache_leftpad is None else cache_leftpad.long()
            table, keys, values = _row_pages(k_cache, v_cache, rows, start)
            seqlens_k, page = seqlens_k - start.to(torch.int32), 1
        out, lse = ops.attention_decode(a.q, keys, values, Call.of(a, mods), seqlens_k=seqlens_k, block_table=table,
                                        page_size=page, num_splits=num_splits, plan=meta and meta.plan)
    return out.transpose(1, 2), lse
