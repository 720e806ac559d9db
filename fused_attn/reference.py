"""The naive PyTorch reference: same signature and semantics as fused_attn.attention, materializing the
(Sq, Sk) scores. The single reference used by the tests, the bench and the CLI."""
import torch

from ._args import DTYPES, check_args, check_kvcache, check_kvcache_values, check_varlen_args
from .mask import visible_mask


def attention(q, k, v, *, causal=False, window_size=(-1, -1), scale=None, layout="bhsd", return_lse=False,
              upcast=torch.float32, return_probs=False, alignment="bottom_right"):
    """Attention computed in `upcast` (torch.float32 / torch.float64, or None: in the inputs' own dtype).

    Returns out in the compute dtype (and lse, float32-or-wider natural log (B, Hq, Sq), if return_lse; and
    the probabilities (B, Hq, Sq, Sk) if return_probs), in that order. Differentiable. Rows that see no key
    give out 0, lse -inf, probabilities 0 and zero gradients. alignment="top_left" gives SDPA's is_causal
    diagonal instead of FlashAttention's bottom-right one.
    """
    a = check_args(q, k, v, causal, window_size, scale, layout, alignment, DTYPES + (torch.float64,))
    dtype = a.q.dtype if upcast is None else upcast
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"upcast must be None, torch.float32 or torch.float64, got {upcast!r}")
    qc, kc, vc = (t.to(dtype) for t in (a.q, a.k, a.v))
    group = qc.shape[1] // kc.shape[1]
    kc, vc = kc.repeat_interleave(group, dim=1), vc.repeat_interleave(group, dim=1)
    Sq, Sk = qc.shape[2], kc.shape[2]

    visible = visible_mask(Sq, Sk, a.left, a.right, a.offset, device=qc.device)
    seen = visible.any(-1, keepdim=True)  # rows with at least one visible key
    scores = torch.matmul(qc, kc.transpose(-1, -2)) * a.scale
    # Rows with nothing visible get finite dummy scores (no NaN in forward or backward), then zeros.
    scores = scores.masked_fill(~visible & seen, float("-inf")).masked_fill(~seen, 0.0)
    probs = torch.softmax(scores, dim=-1).masked_fill(~seen, 0.0)
    out = torch.matmul(probs, vc)
    if layout == "bshd":
        out = out.transpose(1, 2)
    result = [out]
    if return_lse:
        lse = torch.logsumexp(scores.to(torch.promote_types(dtype, torch.float32)), dim=-1)
        result.append(lse.masked_fill(~seen.squeeze(-1), float("-inf")))
    if return_probs:
        result.append(probs)
    return result[0] if len(result) == 1 else tuple(result)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, *, causal=False,
                     window_size=(-1, -1), scale=None, return_lse=False, upcast=torch.float32):
    """fused_attn.attention_varlen's semantics, `attention` run sequence by sequence: out (total_q, Hq, Dv) in
    the compute dtype (and lse (Hq, total_q)). The cu_seqlens values are always checked (this reads them, on any
    device); max_seqlen None: not checked. Rows of no sequence, and sequences with no keys: out 0, lse -inf."""
    va = check_varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window_size,
                           scale, DTYPES + (torch.float64,), values=True)
    dtype = q.dtype if upcast is None else upcast
    cq, ck = va.cu_seqlens_q.tolist(), va.cu_seqlens_k.tolist()
    Hq, Dv = q.shape[1], v.shape[2]
    outs, lses = [], []
    for q0, q1, k0, k1 in zip(cq, cq[1:], ck, ck[1:]):
        if q1 == q0:
            continue
        if k1 == k0:  # no keys: nothing visible
            outs.append(q.new_zeros(q1 - q0, Hq, Dv, dtype=dtype))
            lses.append(torch.full((Hq, q1 - q0), float("-inf"), device=q.device))
            continue
        out, lse = attention(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], causal=causal, window_size=window_size,
                             scale=va.a.scale, layout="bshd", return_lse=True, upcast=upcast)
        outs.append(out[0])
        lses.append(lse[0])
    tail = q.shape[0] - cq[-1]  # rows of no sequence
    outs.append(q.new_zeros(tail, Hq, Dv, dtype=dtype))
    lses.append(torch.full((Hq, tail), float("-inf"), device=q.device))
    lse_dtype = torch.promote_types(dtype, torch.float32)
    out = torch.cat(outs)
    return (out, torch.cat([x.to(lse_dtype) for x in lses], dim=1)) if return_lse else out


def attention_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens=None, block_table=None,
                           causal=False, window_size=(-1, -1), scale=None, return_lse=False, upcast=torch.float32):
    """fused_attn.attention_with_kvcache's semantics without touching the caches: row b attends to its first
    cache_seqlens[b] cached keys followed by its new ones, run row by row through `attention`. Returns out
    (B, Sq, Hq, Dv) in the compute dtype (and lse (B, Hq, Sq)); rows that see no key: out 0, lse -inf."""
    cache_seqlens, capacity, page = check_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, block_table, 0,
                                                  inference_only=False)
    dtype = q.dtype if upcast is None else upcast
    s_new = 0 if k is None else k.shape[1]
    check_kvcache_values(cache_seqlens, s_new, capacity, block_table, page, k_cache.shape[0])
    outs, lses = [], []
    for b, n in enumerate(cache_seqlens.tolist()):
        if block_table is None:
            keys, values = k_cache[b, :n], v_cache[b, :n]
        else:
            pages = block_table[b].long()[:-(-n // page)] if n else block_table[b, :0].long()
            keys, values = (c[pages].flatten(0, 1)[:n] for c in (k_cache, v_cache))
        if k is not None:
            keys, values = torch.cat([keys, k[b]]), torch.cat([values, v[b]])
        if keys.shape[0] == 0:
            outs.append(q.new_zeros(q.shape[1], q.shape[2], v_cache.shape[3], dtype=dtype))
            lses.append(torch.full((q.shape[2], q.shape[1]), float("-inf"), device=q.device))
            continue
        out, lse = attention(q[b:b + 1], keys[None], values[None], causal=causal, window_size=window_size,
                             scale=scale, layout="bshd", return_lse=True, upcast=upcast)
        outs.append(out[0])
        lses.append(lse[0])
    out = torch.stack(outs)
    return (out, torch.stack([x.to(torch.promote_types(dtype, torch.float32)) for x in lses])) if return_lse else out
