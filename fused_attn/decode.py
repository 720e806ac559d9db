"""Decoding: attention_with_kvcache, the split-KV kernels over a contiguous or paged KV cache."""
import torch

from . import ops
from ._args import check_args, check_kernel_inputs, check_kvcache, check_kvcache_values, check_modifiers
from .ops import Call


def _append(cache, new, cache_seqlens, block_table, page):
    """cache[b, cache_seqlens[b] + i] = new[b, i] in place (through the block table when paged); no sync."""
    B, S_new = new.shape[:2]
    pos = cache_seqlens[:, None].long() + torch.arange(S_new, device=new.device)
    if block_table is None:
        cache[torch.arange(B, device=new.device)[:, None], pos] = new
    else:
        cache[block_table.gather(1, pos // page).long(), pos % page] = new


def attention_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens=None, block_table=None,
                           causal=False, window_size=(-1, -1), scale=None, num_splits=0, return_lse=False, softcap=0.0,
                           alibi_slopes=None, sinks=None):
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
        num_splits: key ranges per query tile; 0 picks from the batch, heads, cache length and SM count; 1: none.
        return_lse: also return the log-sum-exp (B, Hq, Sq) float32.
        softcap, alibi_slopes: as in `attention` (ALiBi's distance |i + Sk_b - Sq - j| per row).
        sinks: as in `attention` (float32 (Hq,)): their terms join in the split-KV combine kernel.

    Returns:
        out (B, Sq, Hq, Dv), or (out, lse). Rows that see no key get out 0, lse -inf.

    Checked everywhere: ranks, shapes, dtypes, devices, page size, Hq % Hkv, window, requires_grad. Checked only on
    CPU tensors (reading them from a GPU would synchronize it) and trusted on a GPU, as in FlashAttention:
    cache_seqlens + S_new <= the cache's capacity, and every block_table entry a row uses naming a page that exists.
    """
    cache_seqlens, capacity, page = check_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, block_table, num_splits)
    a = check_args(q, *(c if block_table is None else c[:1].expand(q.shape[0], -1, -1, -1) for c in (k_cache, v_cache)),
                   causal=causal, window_size=window_size, scale=scale, layout="bshd")
    s_new = 0 if k is None else k.shape[1]
    mods = check_modifiers(q.shape[0], q.shape[2], q.device, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks)
    check_kernel_inputs(a)  # a.k, a.v: a row of a contiguous cache, or one page
    if cache_seqlens.device.type == "cpu" and not torch.compiler.is_compiling():
        check_kvcache_values(cache_seqlens, s_new, capacity, block_table, page, k_cache.shape[0])
    with torch.no_grad():
        if k is not None:
            _append(k_cache, k, cache_seqlens, block_table, page)
            _append(v_cache, v, cache_seqlens, block_table, page)
        kv = (lambda t: t.transpose(1, 2))  # (B, S, H, D) and (pages, page_size, H, D) alike
        out, lse = ops.attention_decode(a.q, kv(k_cache), kv(v_cache), Call.of(a, mods),
                                        seqlens_k=cache_seqlens + s_new, block_table=block_table, page_size=page,
                                        num_splits=num_splits)
    out = out.transpose(1, 2)
    return (out, lse) if return_lse else out
