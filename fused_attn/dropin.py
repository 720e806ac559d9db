"""Drop-in replacements: PyTorch's scaled_dot_product_attention (and a scoped override of it) and
FlashAttention-2's flash_attn_func, flash_attn_varlen_func and flash_attn_with_kvcache."""
import contextlib
import dataclasses
import logging
import operator

import torch

from ._args import check_attn_mask, check_modifiers, kernel_args, refuse_fp8
from .function import _attention, attention, attention_probs, masked, with_keep_mask
from .reference import row_slopes
from .replay import CALLS, key_of
from .decode import kvcache_call
from .varlen import attention_varlen, serving_call

log = logging.getLogger("fused_attn")

_torch_sdpa = torch.nn.functional.scaled_dot_product_attention  # the original, for the fallback


def _debug(*args):
    """log.debug outside torch.compile (dynamo cannot trace a logger call: fullgraph would break there)."""
    if not torch.compiler.is_compiling():
        log.debug(*args)


def _as4d(t):
    """(N, ..., H, S, E) -> (B, H, S, E) (a view where the strides allow); (N, S, E) -> (N, 1, S, E)."""
    return t.unsqueeze(1) if t.dim() == 3 else t.flatten(0, -4)


def _mask4d(attn_mask, query):
    """SDPA's attn_mask (broadcastable to (N, ..., L, S)) as a mask broadcastable to the (B, H, L, S) the kernels
    see (_as4d): leading size-1 dims stay broadcast; only a query of more than 4 dims makes a copy."""
    if attn_mask is None:
        return None
    if query.dim() == 3:  # (N, L, E) runs as (N, 1, L, E)
        return attn_mask.unsqueeze(-3) if attn_mask.dim() == 3 else attn_mask
    if query.dim() == 4 or attn_mask.dim() <= 2:
        return attn_mask
    return attn_mask.expand(*query.shape[:-1], attn_mask.shape[-1]).flatten(0, -4)


def _sdpa_plan(query, key, value, attn_mask, dropout_p, scale, enable_gqa, is_causal=False):
    """((Args, Modifiers, bool mask or None), None) if the Triton kernels compute this call exactly, else (None,
    the reason torch's SDPA takes it). Beyond SDPA's own arguments the policy is fused_attn.attention's:
    check_args, device, offsets, the attn_mask check."""
    if not all(isinstance(t, torch.Tensor) for t in (query, key, value)):
        return None, "query, key, value are not all tensors"
    refuse_fp8(query)  # neither path computes FP8 without descales: raise, as fused_attn.attention does
    if attn_mask is not None and is_causal:
        return None, "attn_mask together with is_causal (torch's SDPA refuses the pair)"
    if not (query.dim() == key.dim() == value.dim() >= 3):
        return None, f"ranks {query.dim()}, {key.dim()}, {value.dim()} (need equal ranks >= 3)"
    batch_dims = slice(0, -3) if query.dim() >= 4 else slice(0, 1)
    if not (query.shape[batch_dims] == key.shape[batch_dims] == value.shape[batch_dims]):
        return None, "batch dims differ between query, key and value (broadcasting)"
    if query.dim() >= 4 and query.shape[-3] != key.shape[-3] and not enable_gqa:
        return None, f"heads {query.shape[-3]} vs {key.shape[-3]} without enable_gqa"
    try:
        a = kernel_args(_as4d(query), _as4d(key), _as4d(value), scale=scale)
        mask = _mask4d(attn_mask, query) if isinstance(attn_mask, torch.Tensor) else attn_mask
        if mask is not None:
            check_attn_mask(mask, (*a.q.shape[:3], a.k.shape[2]), a.q.device)
        return (a, check_modifiers(1, 1, a.q.device, dropout_p=dropout_p), mask), None
    except (ValueError, TypeError) as e:
        return None, f"the kernels refuse it: {e}"


def explain(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False) -> str:
    """Which path fused_attn.scaled_dot_product_attention takes for these arguments, and why."""
    _, reason = _sdpa_plan(query, key, value, attn_mask, dropout_p, scale, enable_gqa, is_causal)
    if reason is None:
        kind = "" if attn_mask is None else (" with the bool attn_mask as block lists" if attn_mask.dtype == torch.bool
                                              else " with the float attn_mask as a bias (its -inf blocks skipped)")
        return "fused_attn Triton kernels" + (" (causal, top-left aligned)" if is_causal else "") + kind
    return f"torch scaled_dot_product_attention: {reason}"


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """torch.nn.functional.scaled_dot_product_attention with the same signature and semantics: (N, ..., Hq, L, E)
    query, (N, ..., H, S, E) key, (N, ..., H, S, Ev) value -> (N, ..., Hq, L, Ev); is_causal is top-left aligned.
    The Triton kernels run whenever they can compute the call (fp16/bf16/fp32 on CUDA, any attn_mask); the calls
    they cannot -- float64, CPU tensors without the interpreter, attn_mask together with is_causal (torch raises
    for the pair) -- go to torch's own SDPA. `fused_attn.explain(...)` (or the "fused_attn" logger at DEBUG) says
    which and why. attn_mask runs on the kernels as fused_attn.attention's does: a bool mask as block lists, a float
    one as an additive bias (with its gradient) whose all -inf blocks are skipped; a row it hides entirely gets 0
    (torch's SDPA gives NaN there). dropout_p > 0 runs in the kernels with the same distribution as torch's (each
    probability dropped with probability dropout_p, kept ones scaled by 1 / (1 - dropout_p)) but not the same random
    bits: the kernels draw theirs with Philox from a seed taken from torch's generator (fused_attn.dropout_mask shows
    the mask), so a given seed gives another mask than torch's SDPA does."""
    checked = (lambda: _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa))
    if attn_mask is None and not dropout_p and not torch.compiler.is_compiling() and not log.isEnabledFor(
            logging.DEBUG):
        # A layout's later calls: its recorded launches again (fused_attn/replay.py); calls torch's SDPA takes are
        # never recorded (no launch made their output).
        return CALLS(key_of("sdpa", is_causal, scale, enable_gqa), (query, key, value), checked)
    return checked()


def _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """scaled_dot_product_attention's checked path."""
    plan, reason = _sdpa_plan(query, key, value, attn_mask, dropout_p, scale, enable_gqa, is_causal)
    if reason is not None:
        _debug("scaled_dot_product_attention -> torch: %s", reason)
        return _torch_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                           scale=scale, enable_gqa=enable_gqa)
    _debug("scaled_dot_product_attention -> fused_attn kernels")
    a, mods, mask = plan
    # Top-left causal: diagonal offset 0 instead of FlashAttention's Sk - Sq.
    a = dataclasses.replace(a, offset=0, left=-1, right=0 if is_causal else -1)
    mods, blocks = masked(a, mods, mask)
    out, _ = _attention(a, mods, blocks=blocks)
    if query.dim() == 3:
        return out.squeeze(1)
    return out.reshape(*query.shape[:-3], *out.shape[1:])


@contextlib.contextmanager
def sdpa_override():
    """Route torch.nn.functional.scaled_dot_product_attention to fused_attn's inside the `with` block; the
    original is restored on exit, exceptions included. (Code that imported the function object itself before,
    `from torch.nn.functional import scaled_dot_product_attention`, keeps the original.)"""
    previous = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = scaled_dot_product_attention
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = previous


def flash_attn_window(window_size):
    """FlashAttention-2's window_size as (left, right) ints: any pair of integers -- a tuple or list, a 2-element
    tensor or array, numpy or 0-d tensor integers; a negative side is unbounded (-1), as in flash_attn."""
    try:
        pair = list(window_size)
    except TypeError:
        raise TypeError(f"window_size must be a pair (left, right) of integers, got {window_size!r}") from None
    if len(pair) != 2:
        raise TypeError(f"window_size must be a pair (left, right) of integers, got {len(pair)} values: "
                        f"{window_size!r}")
    sides = []
    for name, w in zip(("left", "right"), pair):
        if isinstance(w, torch.Tensor) and (w.dim() != 0 or w.dtype.is_floating_point or w.dtype == torch.bool):
            raise TypeError(f"window_size {name} must be an integer, got {w!r}")
        if isinstance(w, bool):
            raise TypeError(f"window_size {name} must be an integer, got {w!r}")
        try:
            value = operator.index(w)
        except TypeError:
            raise TypeError(f"window_size {name} must be an integer, got {w!r} ({type(w).__name__})") from None
        sides.append(max(value, -1))
    return tuple(sides)


def _not_implemented(fn: str, **others):
    """NotImplementedError naming every FlashAttention-2 argument given that the kernels do not implement yet."""
    missing = [name for name, value in others.items() if value is not None]
    if missing:
        raise NotImplementedError(f"fused_attn.{fn} does not implement {', '.join(missing)} yet")


def _fa_window(causal, window_size):
    """flash_attn's window: any pair of integers; causal=True sets the right side to 0."""
    if type(window_size) is tuple and len(window_size) == 2 and type(window_size[0]) is type(window_size[1]) is int:
        left, right = window_size  # the common form, on the host's lean path; below -1: none, as -1
        left, right = left if left > -1 else -1, right if right > -1 else -1
    else:
        left, right = flash_attn_window(window_size)
    return (left, 0) if causal else (left, right)


def _signed(probs, keep):
    """FlashAttention-2's S_dmask convention: the probabilities with the dropped entries negated (keep =
    S_dmask >= 0 where a probability is nonzero, probabilities = S_dmask.abs())."""
    return probs if keep is None else torch.where(keep, probs, -probs)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, s_aux=None, q_descale=None,
                    k_descale=None, v_descale=None):
    """FlashAttention-2's flash_attn_func: q (B, Sq, Hq, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv) ->
    out (B, Sq, Hq, Dv); bottom-right aligned causal / window_size as in flash_attn. As there, causal=True sets
    the window's right side to 0. The backward is always deterministic (no atomics), so `deterministic` is
    honoured either way. return_attn_probs=True returns (out, softmax_lse (B, Hq, Sq), probs (B, Hq, Sq, Sk)),
    the probabilities rebuilt exactly from the lse (materialized: for tests and small sizes), before dropout's
    1 / (1 - p), and, with dropout_p > 0, negated where the call dropped them (FlashAttention-2's S_dmask: the
    keep-mask is probs >= 0, the probabilities probs.abs()). dropout_p, softcap, alibi_slopes ((Hq,) or (B, Hq) float32): as in
    fused_attn.attention (dropout_p applies whenever > 0, as in flash_attn). s_aux: attention sinks, float32 (Hq,)
    (vLLM's name; fused_attn.attention's `sinks`). FP8 q, k, v with q_descale / k_descale / v_descale:
    FlashAttention-3's FP8 forward (fused_attn.attention's; output bfloat16)."""
    window_size = _fa_window(causal, window_size)
    mods = dict(softcap=softcap, alibi_slopes=alibi_slopes)

    def call():
        return attention(q, k, v, causal=causal, window_size=window_size, scale=softmax_scale, layout="bshd",
                         return_lse=True, dropout_p=dropout_p, sinks=s_aux, q_descale=q_descale,
                         k_descale=k_descale, v_descale=v_descale, **mods)
    if not return_attn_probs:
        return call()[0]
    (out, lse), keep = with_keep_mask(call, dropout_p, q.device, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
    probs = attention_probs(q.detach(), k.detach(), lse, causal=causal, window_size=window_size,
                            scale=softmax_scale, layout="bshd", sinks=s_aux, **mods)
    return out, lse, _signed(probs, keep)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                           alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None, *,
                           seqused_k=None, out=None, return_softmax_lse=False, num_splits=0, s_aux=None,
                           fa_version=None, q_descale=None, k_descale=None, v_descale=None, scheduler_metadata=None,
                           q_v=None):
    """FlashAttention-2's flash_attn_varlen_func: packed q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv,
    Dv) with int32 cu_seqlens_q / cu_seqlens_k (B + 1,) -> out (total_q, Hq, Dv) (fused_attn.attention_varlen).
    causal / window_size bottom-right aligned within each sequence, causal=True setting the window's right side
    to 0; deterministic as in flash_attn_func. return_attn_probs=True returns (out, softmax_lse (Hq, total_q),
    probs (B, Hq, max_seqlen_q, max_seqlen_k)), each sequence's probabilities rebuilt exactly from the lse in the
    top-left corner of its slice, zeros elsewhere (materialized: for tests and small sizes; dropped entries negated,
    as in flash_attn_func).
    dropout_p, softcap, alibi_slopes, s_aux (sinks): as in fused_attn.attention_varlen.

    The call vLLM's FlashAttention backend makes, by keyword (FlashAttention-3's conventions): k, v paged caches
    (num_pages, page_size, Hkv, D) with block_table (B, max_pages) int32, cu_seqlens_k None and seqused_k (B,)
    int32 keys per sequence (or packed k, v with cu_seqlens_k and seqused_k); num_splits as in
    attention_varlen; out: a (total_q, Hq, Dv) tensor the result is copied into (and returned);
    return_softmax_lse: return (out, softmax_lse); k_descale / v_descale: FP8 caches (attention_varlen's), or with
    q_descale FP8 q, k, v (FlashAttention-3's FP8 forward, packed). fa_version (2 or 3) selects nothing: one
    implementation serves both. scheduler_metadata: the step's plan (fused_attn.get_scheduler_metadata, made once
    and passed to every layer). Not implemented (NotImplementedError, by name): q_v."""
    if q_v is not None:
        _not_implemented("flash_attn_varlen_func", q_v=q_v)
    if fa_version not in (None, 2, 3):
        raise ValueError(f"fa_version must be None, 2 or 3, got {fa_version!r}")
    serving = block_table is not None or seqused_k is not None
    if serving and return_attn_probs:
        raise NotImplementedError("flash_attn_varlen_func does not implement return_attn_probs over a KV cache "
                                  "(block_table / seqused_k)")
    window_size = _fa_window(causal, window_size)
    if serving and q_descale is None:  # attention_varlen over a KV cache, on the host's lean path
        result, lse = serving_call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k,
                                   block_table, num_splits, causal, window_size, softmax_scale, softcap, alibi_slopes,
                                   dropout_p, s_aux, k_descale, v_descale, scheduler_metadata)
        if out is not None:
            result, lse = _into(out, result, lse)
        return (result, lse) if return_softmax_lse else result
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    kw = dict(causal=causal, window_size=window_size, scale=softmax_scale, return_lse=True, dropout_p=dropout_p,
              softcap=softcap, alibi_slopes=alibi_slopes, sinks=s_aux, seqused_k=seqused_k, block_table=block_table,
              num_splits=num_splits, k_descale=k_descale, v_descale=v_descale, q_descale=q_descale,
              scheduler_metadata=scheduler_metadata)
    if not return_attn_probs:
        result, lse = _into(out, *attention_varlen(*args, **kw))
        return (result, lse) if return_softmax_lse else result
    shape = (cu_seqlens_q.shape[0] - 1, q.shape[1], max_seqlen_q, max_seqlen_k)
    (result, lse), keep = with_keep_mask(lambda: attention_varlen(*args, **kw), dropout_p, q.device, shape)
    result, lse = _into(out, result, lse)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    probs = lse.new_zeros(len(cq) - 1, q.shape[1], max_seqlen_q, max_seqlen_k)
    for b, (q0, q1, k0, k1) in enumerate(zip(cq, cq[1:], ck, ck[1:])):
        if q1 > q0 and k1 > k0:
            probs[b, :, :q1 - q0, :k1 - k0] = attention_probs(
                q[None, q0:q1].detach(), k[None, k0:k1].detach(), lse[None, :, q0:q1], causal=causal,
                window_size=window_size, scale=softmax_scale, layout="bshd", softcap=softcap,
                alibi_slopes=row_slopes(alibi_slopes, b), sinks=s_aux)[0]
    return result, lse, _signed(probs, keep)


def _into(out, result, lse):
    """(result copied into `out` where one is given, lse): flash_attn_varlen_func's out=."""
    if out is None:
        return result, lse
    if not isinstance(out, torch.Tensor) or out.shape != result.shape or out.dtype != result.dtype:
        raise ValueError(f"out must be a {result.dtype} tensor of shape {tuple(result.shape)}, got "
                         f"{getattr(out, 'dtype', type(out).__name__)} {tuple(getattr(out, 'shape', ()))}")
    return out.copy_(result), lse


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False, *,
                            s_aux=None, q_descale=None, k_descale=None, v_descale=None, scheduler_metadata=None):
    """FlashAttention-2's flash_attn_with_kvcache (fused_attn.attention_with_kvcache): q (B, Sq, Hq, D) against a
    contiguous (B, S_cache, Hkv, D) or paged (num_pages, page_size, Hkv, D) + block_table cache, k / v appended in
    place at cache_seqlens first; causal / window_size bottom-right aligned per row. Returns out (B, Sq, Hq, Dv),
    or (out, softmax_lse (B, Hq, Sq)) with return_softmax_lse; softcap, alibi_slopes and s_aux (sinks) as in
    fused_attn.attention; rotary_cos / rotary_sin / rotary_interleaved, cache_batch_idx and cache_leftpad with
    FlashAttention-2's semantics, k_descale / v_descale for FP8 caches (FlashAttention-3's;
    fused_attn.attention_with_kvcache), scheduler_metadata (FlashAttention-3's: the step's plan from
    fused_attn.get_scheduler_metadata). Not implemented (NotImplementedError): q_descale (FP8 queries)."""
    if q_descale is not None:
        _not_implemented("flash_attn_with_kvcache", q_descale=q_descale)
    out, lse = kvcache_call(q, k_cache, v_cache, k, v, cache_seqlens, block_table, causal,
                            _fa_window(causal, window_size), softmax_scale, num_splits, softcap, alibi_slopes, s_aux,
                            rotary_cos, rotary_sin, rotary_interleaved, cache_batch_idx, cache_leftpad, k_descale,
                            v_descale, scheduler_metadata)
    return (out, lse) if return_softmax_lse else out
