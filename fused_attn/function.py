"""The autograd Function over the Triton launchers, and the public attention()."""
import re

import numpy
import torch
import triton

from . import kernels, ops
from ._args import check_args
from .mask import visible_mask


def _version(module) -> tuple:
    return tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", module.__version__).groups())


def _check_interpreter():
    """Triton < 3.7's interpreter turns 1-element arrays into loop bounds with int(), which NumPy >= 2.4 refuses
    ("only 0-dimensional arrays can be converted to Python scalars") in every kernel with a runtime-bounded loop."""
    if _version(triton) < (3, 7) and _version(numpy) >= (2, 4):
        raise RuntimeError(f"the Triton {triton.__version__} interpreter cannot run these kernels with NumPy "
                           f"{numpy.__version__}: install 'numpy<2.4' or 'triton>=3.7' to run them on the CPU")


def _check_device(t: torch.Tensor):
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu":
        if kernels.interpreter_active():
            _check_interpreter()
            return
        raise ValueError(
            "fused_attn runs its Triton kernels on CUDA tensors; got CPU tensors. To run the same kernels on the "
            "CPU, set TRITON_INTERPRET=1 in the environment before importing fused_attn (slow; for testing), "
            "or use fused_attn.reference.attention for a plain PyTorch computation.")
    raise ValueError(f"fused_attn supports CUDA tensors (or CPU under TRITON_INTERPRET=1), got device {t.device}")


MAX_OFFSET = 2**31 - 1  # the kernels address within one (batch, head) slice with 32-bit offsets


def _check_offsets(q, k, v, layout, seqlens=None):
    """Within a (batch, head) slice -- a sequence, when packed -- the kernels use int32 offsets: refuse slices that
    would overflow them. seqlens: (Sq, Sk) rows per slice, default the tensors' own."""
    Sq, Sk = seqlens or (q.shape[2], k.shape[2])
    Hq, Dv = q.shape[1], v.shape[-1]
    out_extent = (Sq - 1) * (Hq * Dv if layout == "bshd" else Dv) + Dv - 1
    for name, extent in [(n, (s - 1) * t.stride(2) + (t.shape[3] - 1) * t.stride(3))
                         for n, t, s in (("q", q, Sq), ("k", k, Sk), ("v", v, Sk))] + [("out", out_extent)]:
        if extent > MAX_OFFSET:
            raise ValueError(f"{name} spans {extent} elements within one (batch, head) slice, more than the "
                             f"{MAX_OFFSET} the kernels address with 32-bit offsets; split the sequence")


def check_kernel_inputs(a, layout, seqlens=None):
    """What the kernels themselves need of checked Args (device, 32-bit offsets); raises on anything else."""
    _check_device(a.q)
    _check_offsets(a.q, a.k, a.v, layout, seqlens)


def kernel_args(q, k, v, causal=False, window_size=(-1, -1), scale=None, layout="bhsd"):
    """check_args plus check_kernel_inputs."""
    a = check_args(q, k, v, causal, window_size, scale, layout)
    check_kernel_inputs(a, layout)
    return a


class FusedAttentionFunction(torch.autograd.Function):
    """Takes (B, H, S, D)-indexed views of any strides; returns out (B, Hq, Sq, Dv) laid out as `layout` and
    lse (B, Hq, Sq) float32. Saves q, k, v, out and the softmax stats; forward and backward run the Triton
    kernels through the custom ops fused_attn::forward / fused_attn::backward (fused_attn/ops.py). Packed
    sequences (fused_attn.attention_varlen) add cu_seqlens_q / cu_seqlens_k and the max lengths."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float, offset: int, left: int, right: int, layout: str = "bhsd",
                cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q: int = 0, max_seqlen_k: int = 0):
        packed = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        out, lse, stats = ops.forward(q, k, v, scale, offset, left, right, layout, *packed)
        ctx.save_for_backward(q, k, v, out, stats, cu_seqlens_q, cu_seqlens_k)
        ctx.params = (scale, offset, left, right)
        ctx.lengths = (max_seqlen_q, max_seqlen_k)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, stats, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        dq, dk, dv = ops.backward(dout, q, k, v, out, stats, *ctx.params, cu_seqlens_q, cu_seqlens_k, *ctx.lengths)
        return dq, dk, dv, *[None] * 9


def attention(q, k, v, *, causal=False, window_size=(-1, -1), scale=None, layout="bhsd", return_lse=False):
    """Exact attention softmax(q k^T * scale + mask) v with FlashAttention-style Triton kernels.

    Args:
        q: (B, Hq, Sq, D) for layout "bhsd" (PyTorch SDPA's), (B, Sq, Hq, D) for "bshd" (FlashAttention's).
        k: (B, Hkv, Sk, D) / (B, Sk, Hkv, D).  Hq must be a multiple of Hkv (MHA, GQA, MQA): query head h
           reads key/value head h // (Hq // Hkv).
        v: (B, Hkv, Sk, Dv) / (B, Sk, Hkv, Dv).
           float16, bfloat16 or float32; D, Dv in 1..256; any strides (no copies are made).
        causal: mask keys after the query's diagonal (window right = 0).
        window_size: (left, right); -1 means unbounded on that side. Query row i sees key column j iff

               i + Sk - Sq - left  <=  j  <=  i + Sk - Sq + right

           (FlashAttention-2's bottom-right alignment). Sq = 5, Sk = 7 (x: visible):

               causal=True         window_size=(2, 0)     window_size=(1, 1)
               x x x . . . .       x x x . . . .          . x x x . . .
               x x x x . . .       . x x x . . .          . . x x x . .
               x x x x x . .       . . x x x . .          . . . x x x .
               x x x x x x .       . . . x x x .          . . . . x x x
               x x x x x x x       . . . . x x x          . . . . . x x

           A Mistral / HF `sliding_window=W` is window_size=(W - 1, 0). When Sq > Sk, causal rows
           i < Sq - Sk see no key: they return 0 (lse -inf) and get zero gradients.
        scale: softmax scale, default 1 / sqrt(D).
        layout: "bhsd" or "bshd" (out follows it; lse is (B, Hq, Sq) in both).
        return_lse: also return the log-sum-exp of the scaled scores, float32, natural log.

    Returns:
        out (B, Hq, Sq, Dv) / (B, Sq, Hq, Dv) in the inputs' dtype, or (out, lse).

    Decode steps (at most 16 query rows, fewer batch x heads than SMs, enough keys, no gradient to compute) run the
    split-KV kernels of `attention_with_kvcache` instead of the one-program-per-query-tile grid.
    """
    a = kernel_args(q, k, v, causal, window_size, scale, layout)
    B, Hq, Sq = a.q.shape[:3]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if not grad and kernels.wants_split(B, Hq, Sq, a.k.shape[2], a.q.device):
        # A decode step: split the keys over programs (the regular grid would leave SMs idle); no stats to save.
        out, lse = ops.decode(a.q, a.k, a.v, None, None, 0, a.k.shape[2], a.scale, a.left, a.right, 0, layout)
    else:
        out, lse = FusedAttentionFunction.apply(a.q, a.k, a.v, a.scale, a.offset, a.left, a.right, layout)
    if layout == "bshd":
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out


def attention_probs(q, k, lse, *, causal=False, window_size=(-1, -1), scale=None, layout="bhsd", queries=None,
                    alignment="bottom_right"):
    """The attention weights P = exp(q k^T * scale - lse), masked, rebuilt exactly from the kernel's lse for the
    query rows `queries` (a slice or index tensor; default all): (B, Hq, n_queries, Sk), float32.
    Only the selected rows are materialized, so long sequences stay cheap when a few rows are asked for."""
    a = check_args(q, k, k, causal, window_size, scale, layout, alignment)
    rows = torch.arange(a.q.shape[2], device=a.q.device)[queries if queries is not None else slice(None)]
    group = a.q.shape[1] // a.k.shape[1]
    kk = a.k.float().repeat_interleave(group, dim=1)
    scores = torch.matmul(a.q[:, :, rows].float(), kk.transpose(-1, -2)) * a.scale
    visible = visible_mask(a.q.shape[2], a.k.shape[2], a.left, a.right, a.offset, device=a.q.device)[rows]
    lse_rows = lse[:, :, rows, None]
    p = torch.exp(scores - torch.where(torch.isinf(lse_rows), 0.0, lse_rows))
    return torch.where(visible & torch.isfinite(lse_rows), p, 0.0)
