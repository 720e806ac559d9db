"""The naive PyTorch reference: same signature and semantics as fused_attn.attention, materializing the
(Sq, Sk) scores. The single reference used by the tests, the bench and the CLI."""
import dataclasses

import torch

from ._args import (DTYPES, FP8_DTYPES, check_args, check_descales, check_kvcache, check_kvcache_values,
                    check_modifiers, check_rotary, check_varlen_args, input_dtypes)
from .blockmask import evaluate
from .mask import visible_mask


def modified_scores(q, k, a, softcap=0.0, alibi_slopes=None, rows=None):
    """(scores, visible) of query rows `rows` (index tensor; None: all): q k^T * scale, then softcap * tanh(score /
    softcap) (softcap > 0), then -slope * |i + offset - j| (ALiBi slopes (Hq,) or (B, Hq)), in q's dtype; and the
    boolean (n_rows, Sk) mask. q (B, Hq, Sq, D), k (B, Hq, Sk, D) (kv heads already repeated), a: their Args."""
    Sq, Sk = q.shape[2], k.shape[2]
    rows = torch.arange(Sq, device=q.device) if rows is None else rows
    scores = torch.matmul(q[:, :, rows], k.transpose(-1, -2)) * a.scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        distance = (rows[:, None] + a.offset - torch.arange(Sk, device=q.device)[None, :]).abs()
        slopes = alibi_slopes.to(scores.dtype).reshape(-1, q.shape[1], 1, 1)
        scores = scores - slopes * distance.to(scores.dtype)
    return scores, visible_mask(Sq, Sk, a.left, a.right, a.offset, device=q.device)[rows]


def _check_dropout_mask(mask, dropout_p, shape, device):
    if dropout_p == 0:
        if mask is not None:
            raise ValueError("dropout_mask is given but dropout_p is 0 (no dropout)")
        return
    if mask is None:
        raise ValueError(f"dropout_p={dropout_p} needs the keep-mask: dropout_mask=fused_attn.dropout_mask(...) "
                         f"(the reference draws no random numbers of its own)")
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"dropout_mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    if tuple(mask.shape) != tuple(shape) or mask.device != device:
        raise ValueError(f"dropout_mask must be (B, Hq, Sq, Sk) = {tuple(shape)} on {device}, got "
                         f"{tuple(mask.shape)} on {mask.device}")


def _softmax(scores, visible):
    """(masked scores, probabilities, rows that see a key). Rows with nothing visible get finite dummy scores (no
    NaN in forward or backward), then probabilities 0."""
    seen = visible.any(-1, keepdim=True)
    scores = scores.masked_fill(~visible & seen, float("-inf")).masked_fill(~seen, 0.0)
    return scores, torch.softmax(scores, dim=-1).masked_fill(~seen, 0.0), seen


def probs(q, k, *, causal=False, window_size=(-1, -1), scale=None, layout="bhsd", queries=None,
          upcast=torch.float64, softcap=0.0, alibi_slopes=None, sinks=None):
    """The attention probabilities of `attention` (before dropout) for the query rows `queries` (a slice or index
    tensor; default all) only: (B, Hq, n_queries, Sk) in `upcast` (None: the inputs' dtype); with sinks, the keys'
    share of a softmax that includes them."""
    a = check_args(q, k, k, causal=causal, window_size=window_size, scale=scale, layout=layout,
                   dtypes=DTYPES + (torch.float64,))
    check_modifiers(a.q.shape[0], a.q.shape[1], a.q.device, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks)
    scores, visible, _ = row_scores(a, a.q.dtype if upcast is None else upcast, queries, softcap, alibi_slopes)
    if sinks is None:
        return _softmax(scores, visible)[1]
    scores = torch.cat([scores, sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:3], 1)], -1)
    visible = torch.cat([visible.expand(scores.shape[:3] + (-1,)), torch.ones_like(scores[..., :1], dtype=torch.bool)],
                        -1)
    return _softmax(scores, visible)[1][..., :-1]


def row_scores(a, dtype, queries=None, softcap=0.0, alibi_slopes=None):
    """modified_scores of the query rows `queries` (a slice or index tensor; default all) of checked Args a, in
    `dtype`, the kv heads repeated for GQA: (scores, visible, the row indices)."""
    rows = torch.arange(a.q.shape[2], device=a.q.device)[queries if queries is not None else slice(None)]
    kk = a.k.to(dtype).repeat_interleave(a.q.shape[1] // a.k.shape[1], dim=1)
    return (*modified_scores(a.q.to(dtype), kk, a, softcap, alibi_slopes, rows), rows)


def attention(q, k, v, *, causal=False, window_size=(-1, -1), scale=None, layout="bhsd", return_lse=False,
              upcast=torch.float32, return_probs=False, alignment="bottom_right", softcap=0.0, alibi_slopes=None,
              dropout_p=0.0, dropout_mask=None, mask_mod=None, attn_mask=None, score_mod=None, sinks=None,
              q_descale=None, k_descale=None, v_descale=None):
    """Attention computed in `upcast` (torch.float32 / torch.float64, or None: in the inputs' own dtype).

    Returns out in the compute dtype (and lse, float32-or-wider natural log (B, Hq, Sq), if return_lse; and
    the probabilities (B, Hq, Sq, Sk), before dropout, if return_probs), in that order. Differentiable. Rows that
    see no key give out 0, lse -inf, probabilities 0 and zero gradients. alignment="top_left" gives SDPA's
    is_causal diagonal instead of FlashAttention's bottom-right one. softcap, alibi_slopes, dropout_p: as in
    fused_attn.attention; dropout takes its keep-mask explicitly, dropout_mask (B, Hq, Sq, Sk) bool (from
    fused_attn.dropout_mask): out = (P * mask / (1 - dropout_p)) v. mask_mod(b, h, q_idx, kv_idx) -> bool
    (FlexAttention's mask function; h the query head) hides the pairs where it is False, on top of the window;
    score_mod(score, b, h, q_idx, kv_idx) -> score (FlexAttention's score function, over torch tensors: b (B, 1, 1,
    1), h (1, Hq, 1, 1), q_idx (Sq, 1), kv_idx (1, Sk)) modifies the scores after the scale, softcap and ALiBi;
    attn_mask, broadcastable to (B, Hq, Sq, Sk): bool hides the pairs where it is False, float is added to the
    scores (after all of the above). sinks (Hq,): one more logit per head in each row's softmax (a column that is
    always visible and multiplies nothing); the lse includes it, and a row that sees no key gets out 0, lse = sink.
    FP8 q, k, v with q_descale / k_descale / v_descale ((B, Hkv) or one value): dequantized in float64 first, then
    computed in `upcast` (None: bfloat16, the FP8 forward's default output).
    """
    a = check_args(q, k, v, causal=causal, window_size=window_size, scale=scale, layout=layout, alignment=alignment,
                   dtypes=input_dtypes(q, DTYPES + (torch.float64,)))
    fp8 = a.q.dtype in FP8_DTYPES
    descales = check_descales(dict(q_descale=q_descale, k_descale=k_descale, v_descale=v_descale), a.q.dtype,
                              a.q.shape[0], a.k.shape[1], a.q.device, "q, k, v")
    if fp8:
        dtype = torch.bfloat16 if upcast is None else upcast
        group = a.q.shape[1] // a.k.shape[1]
        a = dataclasses.replace(a, **{n: _dequantized(t.transpose(1, 2), d.repeat_interleave(
            group if n == "q" else 1, dim=1)[:, None].expand(-1, t.shape[2], -1), dtype).transpose(1, 2)
            for n, t, d in zip("qkv", (a.q, a.k, a.v), descales)})
    dtype = a.q.dtype if upcast is None else upcast
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"upcast must be None, torch.float32 or torch.float64, got {upcast!r}")
    B, Hq, Sq = a.q.shape[:3]
    Sk = a.k.shape[2]
    mods = check_modifiers(B, Hq, a.q.device, softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                           sinks=sinks)
    softcap, alibi_slopes, dropout_p = mods.softcap, mods.alibi_slopes, mods.dropout_p
    _check_dropout_mask(dropout_mask, dropout_p, (B, Hq, Sq, Sk), a.q.device)
    qc, kc, vc = (t.to(dtype) for t in (a.q, a.k, a.v))
    group = qc.shape[1] // kc.shape[1]
    kc, vc = kc.repeat_interleave(group, dim=1), vc.repeat_interleave(group, dim=1)

    scores, visible = modified_scores(qc, kc, a, softcap, alibi_slopes)
    if score_mod is not None:
        idx = (lambda n, dims: torch.arange(n, device=qc.device).reshape(dims))
        scores = score_mod(scores, idx(B, (B, 1, 1, 1)), idx(Hq, (1, Hq, 1, 1)), idx(Sq, (Sq, 1)),
                           idx(Sk, (1, Sk))).to(scores.dtype)
    if mask_mod is not None:
        visible = visible & evaluate(mask_mod, B, Hq, torch.arange(Sq, device=qc.device), Sk, qc.device)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        visible = visible & attn_mask
    elif attn_mask is not None:  # -inf hides the pair (a row it hides entirely sees nothing: out 0, lse -inf)
        visible = visible & (attn_mask != float("-inf"))
        scores = scores + attn_mask.to(scores.dtype)
    if sinks is not None:  # the sink column: always visible, dropped after the softmax
        visible = torch.cat([visible.expand(scores.shape), torch.ones_like(scores[..., :1], dtype=torch.bool)], -1)
        scores = torch.cat([scores, sinks.to(scores.dtype).view(1, Hq, 1, 1).expand(B, Hq, Sq, 1)], -1)
    scores, probs, seen = _softmax(scores, visible)
    if sinks is not None:
        probs = probs[..., :-1]
    dropped = probs if dropout_mask is None else probs * dropout_mask / (1 - dropout_p)
    out = torch.matmul(dropped, vc)
    if layout == "bshd":
        out = out.transpose(1, 2)
    result = [out]
    if return_lse:
        lse = torch.logsumexp(scores.to(torch.promote_types(dtype, torch.float32)), dim=-1)
        result.append(lse.masked_fill(~seen.squeeze(-1), float("-inf")))
    if return_probs:
        result.append(probs)
    return result[0] if len(result) == 1 else tuple(result)


def row_slopes(alibi_slopes, b):
    """Batch row b's ALiBi slopes from (Hq,) or (B, Hq) ones: (Hq,), or None without ALiBi."""
    return alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b]


def _empty_lse(heads, rows, sinks, device):
    """The lse of rows that see no key: -inf, or each head's sink."""
    if sinks is None:
        return torch.full((heads, rows), float("-inf"), device=device)
    return sinks.double()[:, None].expand(heads, rows)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, *, causal=False,
                     window_size=(-1, -1), scale=None, return_lse=False, upcast=torch.float32, softcap=0.0,
                     alibi_slopes=None, dropout_p=0.0, dropout_mask=None, sinks=None, seqused_k=None,
                     block_table=None, k_descale=None, v_descale=None):
    """fused_attn.attention_varlen's semantics, `attention` run sequence by sequence: out (total_q, Hq, Dv) in
    the compute dtype (and lse (Hq, total_q)). seqused_k / block_table (paged k, v): each sequence's keys are
    gathered by indexing (its first seqused_k[b] rows, or slots of its pages) first. The cu_seqlens values are
    always checked (this reads them, on any device); max_seqlen None: not checked. Rows of no sequence, and
    sequences with no keys: out 0, lse -inf. dropout_mask: (B, Hq, Sq_max, Sk_max) bool, sequence b using [b, :,
    :Sq_b, :Sk_b] (as fused_attn.dropout_mask (B, Hq, max_seqlen_q, max_seqlen_k) gives it)."""
    if seqused_k is not None or block_table is not None:
        k, v, cu_seqlens_k = _used_keys(k, v, cu_seqlens_k, seqused_k, block_table)
    if k.dtype in FP8_DTYPES:  # dequantized sequence by sequence, in the compute dtype (q too)
        dtype = q.dtype if upcast is None else upcast
        ends = cu_seqlens_k[1:].long()
        rows = torch.searchsorted(ends, torch.arange(k.shape[0], device=k.device), right=True).clamp(max=len(ends) - 1)
        k_descale, v_descale = check_descales(dict(k_descale=k_descale, v_descale=v_descale), k.dtype,
                                              len(cu_seqlens_k) - 1, k.shape[1], k.device)
        q, k, v = q.to(dtype), _dequantized(k, k_descale[rows], dtype), _dequantized(v, v_descale[rows], dtype)
    a, packed = check_varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                                  window_size=window_size, scale=scale, dtypes=DTYPES + (torch.float64,),
                                  values=True)
    dtype = q.dtype if upcast is None else upcast
    cq, ck = packed.cu_seqlens_q.tolist(), packed.cu_seqlens_k.tolist()
    check_modifiers(len(cq) - 1, q.shape[1], q.device, softcap=softcap, alibi_slopes=alibi_slopes,
                    dropout_p=dropout_p, sinks=sinks)
    if dropout_p > 0 and (not isinstance(dropout_mask, torch.Tensor) or dropout_mask.dim() != 4):
        raise ValueError("dropout_p > 0 needs dropout_mask (B, Hq, Sq_max, Sk_max) bool")
    Hq, Dv = q.shape[1], v.shape[2]
    outs, lses = [], []
    for b, (q0, q1, k0, k1) in enumerate(zip(cq, cq[1:], ck, ck[1:])):
        if q1 == q0:
            continue
        if k1 == k0:  # no keys: nothing visible (but the sinks)
            outs.append(q.new_zeros(q1 - q0, Hq, Dv, dtype=dtype))
            lses.append(_empty_lse(Hq, q1 - q0, sinks, q.device))
            continue
        mask = None if dropout_p == 0 else dropout_mask[b:b + 1, :, :q1 - q0, :k1 - k0]
        out, lse = attention(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], causal=causal, window_size=window_size,
                             scale=a.scale, layout="bshd", return_lse=True, upcast=upcast, softcap=softcap,
                             alibi_slopes=row_slopes(alibi_slopes, b), dropout_p=dropout_p, dropout_mask=mask,
                             sinks=sinks)
        outs.append(out[0])
        lses.append(lse[0])
    tail = q.shape[0] - cq[-1]  # rows of no sequence
    outs.append(q.new_zeros(tail, Hq, Dv, dtype=dtype))
    lses.append(torch.full((Hq, tail), float("-inf"), device=q.device))
    lse_dtype = torch.promote_types(dtype, torch.float32)
    out = torch.cat(outs)
    return (out, torch.cat([x.to(lse_dtype) for x in lses], dim=1)) if return_lse else out


def _dequantized(x, descale, dtype):
    """An FP8 cache's rows x (S, Hkv, D) times their descales (S, Hkv), computed in float64, as dtype."""
    return (x.double() * descale.double()[..., None]).to(dtype)


def _quantized(x, descale, fp8_dtype):
    """What write_kv_cache stores for x (S, Hkv, D) in an FP8 cache: x / descale (S, Hkv), clamped, rounded."""
    fmax = torch.finfo(fp8_dtype).max
    return (x.double() / descale.double()[..., None]).clamp(-fmax, fmax).to(fp8_dtype)


def _used_keys(k, v, cu_seqlens_k, seqused_k, block_table):
    """(k, v, cu_seqlens_k) packed from the keys each sequence uses: rows cu_seqlens_k[b] : + seqused_k[b] of
    packed k, v, or, paged (block_table), slots 0 .. seqused_k[b] - 1 of its pages in order."""
    if block_table is not None and (seqused_k is None or cu_seqlens_k is not None):
        raise ValueError("paged keys (block_table) take seqused_k and cu_seqlens_k=None")
    used, ks, vs = seqused_k.tolist(), [], []
    for b, n in enumerate(used):
        r = torch.arange(n, device=k.device)
        if block_table is None:
            idx = (int(cu_seqlens_k[b]) + r,)
        else:
            idx = (block_table[b].long()[r // k.shape[1]], r % k.shape[1])
        ks.append(k[idx])
        vs.append(v[idx])
    cu = torch.tensor([0] + used, dtype=torch.int64).cumsum(0).to(device=k.device, dtype=torch.int32)
    return torch.cat(ks), torch.cat(vs), cu


def _rotated(x, cos, sin, first, same, interleaved):
    """x (S, H, D) with its first 2 * cos.shape[1] dims rotated as complex numbers by the angles at positions
    first, first + 1, ... (first None: all at position `same`); pairs (2i, 2i + 1) if interleaved, else (i,
    i + rotary_dim / 2). In float64."""
    rd = 2 * cos.shape[1]
    pos = torch.arange(x.shape[0], device=x.device) + first if first is not None else torch.full(
        (x.shape[0],), same, device=x.device)
    turn = torch.complex(cos[pos].double(), sin[pos].double())  # cos + i sin, as given
    head = x[..., :rd].double()
    pairs = head.unflatten(-1, (rd // 2, 2)) if interleaved else torch.stack(head.chunk(2, -1), -1)
    rotated = torch.view_as_real(torch.view_as_complex(pairs.contiguous()) * turn[:, None])
    head = rotated.flatten(-2) if interleaved else torch.cat([rotated[..., 0], rotated[..., 1]], -1)
    return torch.cat([head.to(x.dtype), x[..., rd:]], -1)


def attention_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens=None, block_table=None,
                           causal=False, window_size=(-1, -1), scale=None, return_lse=False, upcast=torch.float32,
                           softcap=0.0, alibi_slopes=None, sinks=None, rotary_cos=None, rotary_sin=None,
                           rotary_interleaved=True, cache_batch_idx=None, cache_leftpad=None, k_descale=None,
                           v_descale=None):
    """fused_attn.attention_with_kvcache's semantics without touching the caches: row b attends to cache row
    cache_batch_idx[b]'s (default b) keys cache_leftpad[b] (default 0) .. cache_seqlens[b] - 1 followed by its new
    ones (rotated with rotary_cos / rotary_sin, as q, where given), run row by row through `attention`. FP8
    caches: the keys dequantized in float64 (new ones quantized first, as the cache write stores them), q and
    they then in the compute dtype. Returns out
    (B, Sq, Hq, Dv) in the compute dtype (and lse (B, Hq, Sq)); rows that see no key: out 0, lse -inf."""
    cache_seqlens, capacity, page = check_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, block_table, 0,
                                                  inference_only=False, cache_batch_idx=cache_batch_idx,
                                                  cache_leftpad=cache_leftpad)
    check_rotary(q, k, rotary_cos, rotary_sin)
    dtype = q.dtype if upcast is None else upcast
    s_new = 0 if k is None else k.shape[1]
    check_kvcache_values(cache_seqlens, s_new, capacity, block_table, page, k_cache.shape[0], cache_batch_idx,
                         cache_leftpad, k_cache.shape[0])
    check_modifiers(q.shape[0], q.shape[2], q.device, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks)
    descales = check_descales(dict(k_descale=k_descale, v_descale=v_descale), k_cache.dtype, q.shape[0],
                              k_cache.shape[2], q.device)
    if rotary_cos is not None:
        moving = causal or tuple(window_size) != (-1, -1)
        q = torch.stack([_rotated(q[b], rotary_cos, rotary_sin, n if moving else None, n, rotary_interleaved)
                         for b, n in enumerate(cache_seqlens.tolist())])
        k = torch.stack([_rotated(k[b], rotary_cos, rotary_sin, n, n, rotary_interleaved)
                         for b, n in enumerate(cache_seqlens.tolist())])
    rows = range(q.shape[0]) if cache_batch_idx is None else cache_batch_idx.tolist()
    starts = [0] * q.shape[0] if cache_leftpad is None else cache_leftpad.tolist()
    outs, lses = [], []
    for b, n in enumerate(cache_seqlens.tolist()):
        if block_table is None:
            keys, values = k_cache[rows[b], starts[b]:n], v_cache[rows[b], starts[b]:n]
        else:
            pages = block_table[b].long()[:-(-n // page)] if n else block_table[b, :0].long()
            keys, values = (c[pages].flatten(0, 1)[:n] for c in (k_cache, v_cache))
        if k is not None and descales[0] is not None:
            keys, values = (torch.cat([c, _quantized(x[b], d[b].expand(x.shape[1], -1), c.dtype)])
                            for c, x, d in ((keys, k, descales[0]), (values, v, descales[1])))
        elif k is not None:
            keys, values = torch.cat([keys, k[b]]), torch.cat([values, v[b]])
        if descales[0] is not None:
            keys, values = (_dequantized(c, d[b].expand(c.shape[0], -1), dtype) for c, d in zip((keys, values),
                                                                                                  descales))
        if keys.shape[0] == 0:
            outs.append(q.new_zeros(q.shape[1], q.shape[2], v_cache.shape[3], dtype=dtype))
            lses.append(_empty_lse(q.shape[2], q.shape[1], sinks, q.device))
            continue
        out, lse = attention(q[b:b + 1].to(keys.dtype), keys[None], values[None], causal=causal,
                             window_size=window_size, scale=scale, layout="bshd", return_lse=True, upcast=upcast,
                             softcap=softcap,
                             alibi_slopes=row_slopes(alibi_slopes, b), sinks=sinks)
        outs.append(out[0])
        lses.append(lse[0])
    out = torch.stack(outs)
    return (out, torch.stack([x.to(torch.promote_types(dtype, torch.float32)) for x in lses])) if return_lse else out


def alibi_slopes(heads: int, device=None) -> torch.Tensor:
    """ALiBi's geometric slopes 2^(-8 h / heads) for h = 1..heads (the paper's, for any head count), float32
    (heads,), as `attention(..., alibi_slopes=...)` takes them."""
    s = 2.0 ** (-8.0 * torch.arange(1, heads + 1, dtype=torch.float64) / heads)
    return s.to(device=device, dtype=torch.float32)
