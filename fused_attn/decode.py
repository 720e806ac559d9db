"""Decoding: attention_with_kvcache (split-KV kernels over a contiguous or paged KV cache), and merge_attention,
which combines results computed over disjoint key sets (split-KV, context parallelism) by their log-sum-exps."""
import torch

from . import ops
from ._args import check_args, check_kvcache, check_kvcache_values, check_modifiers
from .function import _check_device


def _check_parts(outs, lses):
    if isinstance(outs, torch.Tensor) or isinstance(lses, torch.Tensor):
        raise TypeError("outs and lses must be sequences of tensors (one per key set), not a single tensor")
    outs, lses = list(outs), list(lses)
    if not outs or len(outs) != len(lses):
        raise ValueError(f"need one lse per partial output and at least one part, got {len(outs)} outs and "
                         f"{len(lses)} lses")
    ref = outs[0]
    for i, (o, lse) in enumerate(zip(outs, lses)):
        if not isinstance(o, torch.Tensor) or not isinstance(lse, torch.Tensor):
            raise TypeError(f"part {i}: out and lse must be tensors, got {type(o).__name__}, {type(lse).__name__}")
        if o.dim() != 4 or o.shape != ref.shape:
            raise ValueError(f"part {i}: out must be (B, Hq, Sq, Dv) like part 0 {tuple(ref.shape)}, "
                             f"got {tuple(o.shape)}")
        if o.dtype != ref.dtype or not o.dtype.is_floating_point:
            raise TypeError(f"part {i}: out dtype {o.dtype}, part 0 has {ref.dtype} (one floating dtype for all)")
        if lse.dtype != torch.float32:
            raise TypeError(f"part {i}: lse must be float32, got {lse.dtype}")
        if lse.shape != o.shape[:-1]:
            raise ValueError(f"part {i}: lse must be (B, Hq, Sq) = {tuple(o.shape[:-1])}, got {tuple(lse.shape)}")
        if o.device != ref.device or lse.device != ref.device:
            raise ValueError(f"part {i}: out on {o.device}, lse on {lse.device}, part 0 on {ref.device}")
    return outs, lses


def merge_attention(outs, lses):
    """Attention over the union of disjoint key sets, from the results over each set.

    Args:
        outs: P partial outputs (B, Hq, Sq, Dv), each as `attention(..., return_lse=True)` returns it in the
            "bhsd" layout (any strides), one floating dtype.
        lses: their P log-sum-exps (B, Hq, Sq), float32, natural log; -inf where a row saw no key of that set.

    Returns:
        (out, lse): out (B, Hq, Sq, Dv) in the outs' dtype and lse (B, Hq, Sq) float32 of attention over all the
        keys:

            lse = log sum_p exp(lse_p),        out = sum_p exp(lse_p - lse) * out_p

        computed in fp32, in the parts' order (deterministic). A part whose lse is -inf for a row adds exactly
        nothing to it; a row empty in every part gets out 0 and lse -inf, as `attention` returns it. The lses are
        trusted to be finite or -inf (checking would synchronize a GPU).
    """
    outs, lses = _check_parts(outs, lses)
    stacked = torch.stack(lses)  # (P, B, Hq, Sq)
    lse = torch.logsumexp(stacked, dim=0)  # -inf where every part is -inf
    seen = torch.isfinite(lse)
    weights = torch.where(seen, torch.exp(stacked - torch.where(seen, lse, 0.0)), 0.0)
    out = torch.zeros(outs[0].shape, device=outs[0].device, dtype=torch.float32)
    for w, o in zip(weights, outs):  # where(): an empty part's out is not read (0 * NaN would be NaN)
        out += torch.where(w[..., None] > 0, w[..., None] * o.float(), 0.0)
    return out.to(outs[0].dtype), lse


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
                           alibi_slopes=None):
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

    Returns:
        out (B, Sq, Hq, Dv), or (out, lse). Rows that see no key get out 0, lse -inf.

    Checked everywhere: ranks, shapes, dtypes, devices, page size, Hq % Hkv, window, requires_grad. Checked only on
    CPU tensors (reading them from a GPU would synchronize it) and trusted on a GPU, as in FlashAttention:
    cache_seqlens + S_new <= the cache's capacity, and every block_table entry a row uses naming a page that exists.
    """
    cache_seqlens, capacity, page = check_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, block_table, num_splits)
    a = check_args(q, *(c if block_table is None else c[:1].expand(q.shape[0], -1, -1, -1) for c in (k_cache, v_cache)),
                   causal, window_size, scale, "bshd")
    s_new = 0 if k is None else k.shape[1]
    softcap, alibi_slopes, _ = check_modifiers(q.shape[0], q.shape[2], q.device, softcap, alibi_slopes)
    _check_device(a.q)
    if cache_seqlens.device.type == "cpu" and not torch.compiler.is_compiling():
        check_kvcache_values(cache_seqlens, s_new, capacity, block_table, page, k_cache.shape[0])
    with torch.no_grad():
        if k is not None:
            _append(k_cache, k, cache_seqlens, block_table, page)
            _append(v_cache, v, cache_seqlens, block_table, page)
        kv = (lambda t: t.transpose(1, 2))  # (B, S, H, D) and (pages, page_size, H, D) alike
        out, lse = ops.decode(a.q, kv(k_cache), kv(v_cache), cache_seqlens + s_new, block_table, page, capacity,
                              a.scale, a.left, a.right, num_splits, "bshd", softcap, alibi_slopes)
    out = out.transpose(1, 2)
    return (out, lse) if return_lse else out
