"""Packed variable-length batches (FlashAttention-2's "varlen" layout): attention_varlen, and cu_seqlens."""
import dataclasses

import torch

from . import ops
from ._args import (check_descales, check_fp8, check_kernel_inputs, check_modifiers, check_serving_varlen,
                    check_varlen_args, input_dtypes)
from .function import _attention
from .kernels import Packed
from .ops import Call
from .replay import key_of
from .schedule import check_metadata, replayable


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False,
                     window_size=(-1, -1), scale=None, return_lse=False, softcap=0.0, alibi_slopes=None,
                     dropout_p=0.0, sinks=None, seqused_k=None, block_table=None, num_splits=0, k_descale=None,
                     v_descale=None, q_descale=None, out_dtype=None, scheduler_metadata=None):
    """Exact attention over a batch of sequences of different lengths packed along the first dimension, with the
    kernels of `attention` (forward and deterministic backward); no padding is computed.

    Args:
        q: (total_q, Hq, D); sequence b's queries are rows cu_seqlens_q[b] : cu_seqlens_q[b + 1].
        k: (total_k, Hkv, D), v: (total_k, Hkv, Dv); sequence b's keys are rows cu_seqlens_k[b] : cu_seqlens_k[b + 1].
           dtypes, head dims, GQA (Hq % Hkv == 0) and strides as in `attention`.
        cu_seqlens_q, cu_seqlens_k: int32 (B + 1,) on the tensors' device: 0, then the running sum of the
           lengths (non-decreasing; the last entry <= total_q / total_k, later rows are not read). Sequences of
           length 0 are allowed.
        max_seqlen_q, max_seqlen_k: ints >= the longest query / key sequence; they size the grid.
        causal, window_size, scale: as in `attention`, applied within each sequence, bottom-right aligned to the
           pair (Sq_b, Sk_b): query row i of sequence b sees its key j iff

               i + Sk_b - Sq_b - left  <=  j  <=  i + Sk_b - Sq_b + right

           e.g. two sequences (Sq, Sk) = (3, 3) and (2, 4), causal (x: visible):

               x . . | . . . .
               x x . | . . . .
               x x x | . . . .
               ------+--------
               . . . | x x x .
               . . . | x x x x

        return_lse: also return the log-sum-exp, (Hq, total_q) float32, natural log (FlashAttention's varlen
           convention).
        softcap, alibi_slopes ((Hq,) or (B, Hq): per sequence), dropout_p: as in `attention`, within each sequence
           (ALiBi's distance |i + Sk_b - Sq_b - j|; sequence b's dropout mask is
           fused_attn.dropout_mask(B, Hq, max_seqlen_q, max_seqlen_k)[b, :, :Sq_b, :Sk_b] of the same generator state).
        sinks: as in `attention`, per query head, in every sequence.
        seqused_k: int32 (B,): sequence b uses only its first seqused_k[b] keys (FlashAttention-3's convention):
           rows cu_seqlens_k[b] : cu_seqlens_k[b] + seqused_k[b], or of its pages; the mask aligns to that length.
        block_table: int32 (B, max_pages): k and v are paged KV caches (num_pages, page_size, Hkv, D / Dv), page
           size a multiple of 16, sequence b's keys in pages block_table[b, 0], block_table[b, 1], ... (key j at
           slot j % page_size of page block_table[b, j // page_size]); then seqused_k gives each sequence's key
           count and cu_seqlens_k is None (vLLM's call, with max_seqlen_k >= every seqused_k) -- or, FlashAttention-2's
           paged call, cu_seqlens_k gives the key counts as running sums and seqused_k is None:

               attention_varlen(q, k_pages, v_pages, cu_seqlens_q, None, max_seqlen_q, max_seqlen_k,
                                seqused_k=seqused_k, block_table=block_table, causal=True)

           A batch may mix prefill chunks, speculative drafts and single-token decodes (each sequence's mask
           bottom-right aligned to its own (Sq_b, Sk_b)): with seqused_k or block_table the call runs the split-KV
           kernels of `attention_with_kvcache` (forward only: a backward that reaches them raises; no dropout),
           which balance the work themselves -- sequences with more queries than one tile take the tiled grid, the
           others have their keys split over up to 32 programs merged by their log-sum-exps (deterministic).
        num_splits: with seqused_k / block_table, the most key ranges a short sequence is split into (1: none;
           0: chosen as attention_with_kvcache's are, from the batch, heads, keys and SM count); 0 otherwise.
        k_descale, v_descale: with seqused_k / block_table, k and v may be FP8 caches (torch.float8_e4m3fn /
           float8_e5m2, as `write_kv_cache` fills them) for a float16 / bfloat16 / float32 q: float32 (B, Hkv)
           (or one value), sequence b's kv head h reading keys k * k_descale[b, h] and values v * v_descale[b, h]
           (FlashAttention-3's convention). The kernels load the FP8 tiles -- half the bytes of a 16-bit cache --
           and convert them in registers; k_descale multiplies the scores, v_descale the output. Output in q's
           dtype.
        q_descale, out_dtype: FP8 q, k, v (packed, without seqused_k / block_table): `attention`'s FP8 forward,
           the descales (B, Hkv) per sequence (forward only).
        scheduler_metadata: with seqused_k / block_table, the step's plan from fused_attn.get_scheduler_metadata
           (made once with cu_seqlens_q, passed to every layer): the call checks its tensors against it and skips
           the per-call planning and value checks.

    Returns:
        out (total_q, Hq, Dv) in the inputs' dtype, or (out, lse). Rows past cu_seqlens_q[-1] and rows that see
        no key (e.g. a sequence with Sk_b = 0) get out 0 and lse -inf; keys past cu_seqlens_k[-1] get zero
        gradients.

    Checked on every device: ranks, dtypes, devices, head dims, Hq % Hkv, the window, cu_seqlens' dtype, shape and
    device. The cu_seqlens values (0 first, non-decreasing, last entry <= total, each length <= max_seqlen) are
    checked only when they are on the CPU (interpreter) and not under torch.compile; on a GPU, as in
    FlashAttention, they are trusted, since reading them would synchronize the device -- wrong values there give
    wrong results, not an error (`fused_attn.reference.attention_varlen` checks them anywhere).
    """
    if seqused_k is not None or block_table is not None:
        if q_descale is not None or out_dtype is not None:
            raise ValueError("q_descale / out_dtype (FP8 queries) are not implemented over a KV cache; FP8 caches "
                             "take k_descale / v_descale with 16/32-bit queries")
        out, lse = serving_call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k,
                                block_table, num_splits, causal, window_size, scale, softcap, alibi_slopes, dropout_p,
                                sinks, k_descale, v_descale, scheduler_metadata)
        return (out, lse) if return_lse else out
    if scheduler_metadata is not None:
        raise ValueError("scheduler_metadata plans calls over a KV cache (seqused_k / block_table); this call has "
                         "neither")
    if num_splits:
        raise ValueError(f"num_splits ({num_splits!r}) applies to calls over a KV cache (seqused_k / block_table); "
                         f"pass 0")
    a, packed = check_varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                                  window_size=window_size, scale=scale, dtypes=input_dtypes(q))
    check_kernel_inputs(a, packed)
    batch = cu_seqlens_q.shape[0] - 1
    mods = check_modifiers(batch, q.shape[1], q.device, softcap=softcap, alibi_slopes=alibi_slopes,
                           dropout_p=dropout_p, sinks=sinks)
    mods, out_dtype = check_fp8(a, mods, batch, dict(q_descale=q_descale, k_descale=k_descale, v_descale=v_descale),
                                out_dtype)
    out, lse = _attention(a, mods, packed, out_dtype=out_dtype)
    out = out.transpose(1, 2)[0]
    return (out, lse[0]) if return_lse else out


def serving_call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, block_table, num_splits,
                 causal, window_size, scale, softcap, alibi_slopes, dropout_p, sinks, k_descale, v_descale,
                 scheduler_metadata):
    """attention_varlen over a KV cache, its arguments in order, positionally (the drop-in's lean path) -> (out,
    lse); its plan's replay where it may take one."""
    meta = check_metadata(scheduler_metadata, "attention_varlen")
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, block_table, num_splits,
            causal, window_size, scale, softcap, alibi_slopes, dropout_p, sinks, k_descale, v_descale, meta)
    if replayable(meta, window_size):
        # A step's per-layer call: the plan replays what the first such call launched (SchedulerMetadata.replays).
        key = key_of("serving", max_seqlen_q, max_seqlen_k, causal, *window_size, scale, num_splits, softcap,
                     dropout_p)
        return meta.replays(key, (q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table, alibi_slopes, sinks,
                                  k_descale, v_descale), _serving, args)
    return _serving(*args)


def _serving(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, block_table, num_splits,
             causal, window_size, scale, softcap, alibi_slopes, dropout_p, sinks, k_descale, v_descale, meta):
    """attention_varlen over a KV cache (seqused_k / block_table): the split-KV kernels, forward only. meta: the
    step's SchedulerMetadata (its values checked when it was made) or None."""
    a, packed, page, seqused_k = check_serving_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                      max_seqlen_k, seqused_k, block_table, num_splits,
                                                      values=meta is None, causal=causal, window_size=window_size,
                                                      scale=scale)
    if meta is not None:
        meta.check("attention_varlen", q, k, cu_seqlens_q.shape[0] - 1, True, page, packed.max_seqlen_q)
    check_kernel_inputs(a, Packed(cu_seqlens_q, cu_seqlens_k, packed.max_seqlen_q,
                                  page if page else packed.max_seqlen_k))
    batch = cu_seqlens_q.shape[0] - 1
    mods = check_modifiers(batch, q.shape[1], q.device, softcap=softcap, alibi_slopes=alibi_slopes,
                           dropout_p=dropout_p, sinks=sinks)
    k_descale, v_descale = check_descales(dict(k_descale=k_descale, v_descale=v_descale), k.dtype, batch,
                                          a.k.shape[1], q.device)
    mods = dataclasses.replace(mods, k_descale=k_descale, v_descale=v_descale)
    if mods.dropout_p:
        raise ValueError(f"dropout_p ({mods.dropout_p}) is for training: attention_varlen over a KV cache "
                         f"(seqused_k / block_table) is inference only")
    keys, values = (t.transpose(1, 2) if page else t.unsqueeze(0).transpose(1, 2) for t in (k, v))
    with torch.no_grad():
        out, lse = ops.attention_decode(a.q, keys, values, Call.of(a, mods, packed), seqlens_k=seqused_k,
                                        block_table=block_table, page_size=page, num_splits=num_splits,
                                        plan=meta and meta.plan)
    out, lse = out.transpose(1, 2)[0], lse[0]
    inputs = [t for t in (q, k, v, mods.sinks, mods.alibi_slopes) if t is not None and t.requires_grad]
    if inputs and torch.is_grad_enabled():  # FlashAttention-2 runs the forward; only a backward is refused
        out, lse = _ForwardOnly.apply(out, lse, *inputs)
    return out, lse


class _ForwardOnly(torch.autograd.Function):
    """(out, lse, *inputs) -> out, lse, joined to the inputs' graph, whose backward raises: the split-KV kernels
    over a KV cache have no backward, and a forward on inputs that require grad is still a valid call."""

    @staticmethod
    def forward(ctx, out, lse, *inputs):
        return out.view_as(out), lse.view_as(lse)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("attention_varlen over a KV cache (block_table / seqused_k: a paged or used-prefix cache, "
                           "the split-KV kernels) has no backward; compute gradients with packed k, v and "
                           "cu_seqlens_k (no seqused_k / block_table), or run the forward under torch.no_grad()")


def cu_seqlens(lengths, device=None) -> torch.Tensor:
    """int32 (B + 1,) for `attention_varlen`: 0, then the running sum of the sequence lengths."""
    return torch.tensor([0] + list(lengths), dtype=torch.int64).cumsum(0).to(device=device, dtype=torch.int32)
