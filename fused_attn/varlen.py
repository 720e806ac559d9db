"""Packed variable-length batches (FlashAttention-2's "varlen" layout): attention_varlen, and cu_seqlens."""
import torch

from ._args import check_kernel_inputs, check_modifiers, check_varlen_args
from .function import _attention


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False,
                     window_size=(-1, -1), scale=None, return_lse=False, softcap=0.0, alibi_slopes=None,
                     dropout_p=0.0, sinks=None):
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
    a, packed = check_varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                                  window_size=window_size, scale=scale)
    check_kernel_inputs(a, packed)
    mods = check_modifiers(cu_seqlens_q.shape[0] - 1, q.shape[1], q.device, softcap=softcap,
                           alibi_slopes=alibi_slopes, dropout_p=dropout_p, sinks=sinks)
    out, lse = _attention(a, mods, packed)
    out = out.transpose(1, 2)[0]
    return (out, lse[0]) if return_lse else out


def cu_seqlens(lengths, device=None) -> torch.Tensor:
    """int32 (B + 1,) for `attention_varlen`: 0, then the running sum of the sequence lengths."""
    return torch.tensor([0] + list(lengths), dtype=torch.int64).cumsum(0).to(device=device, dtype=torch.int32)
