"""The autograd Function over the Triton launchers, and the public attention()."""
import numbers
import re

import numpy
import torch
import triton

from . import kernels, ops
from ._args import _check_length, check_args, check_modifiers
from .kernels.forward import dropout_keep_mask
from .reference import row_scores


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
    sequences (fused_attn.attention_varlen) add cu_seqlens_q / cu_seqlens_k and the max lengths; softcap,
    alibi_slopes and dropout_p are checked values (check_modifiers). Dropout's [seed, offset] is saved, not its
    mask: the backward draws the same mask again."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float, offset: int, left: int, right: int, layout: str = "bhsd",
                cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q: int = 0, max_seqlen_k: int = 0,
                softcap: float = 0.0, alibi_slopes=None, dropout_p: float = 0.0):
        packed = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        out, lse, stats, rng = ops.forward(q, k, v, scale, offset, left, right, layout, *packed, softcap,
                                           alibi_slopes, dropout_p)
        ctx.save_for_backward(q, k, v, out, stats, cu_seqlens_q, cu_seqlens_k, alibi_slopes, rng)
        ctx.params = (scale, offset, left, right)
        ctx.lengths = (max_seqlen_q, max_seqlen_k)
        ctx.mods = (softcap, dropout_p)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, stats, cu_seqlens_q, cu_seqlens_k, alibi_slopes, rng = ctx.saved_tensors
        softcap, dropout_p = ctx.mods
        dq, dk, dv = ops.backward(dout, q, k, v, out, stats, *ctx.params, cu_seqlens_q, cu_seqlens_k, *ctx.lengths,
                                  softcap, alibi_slopes, dropout_p, rng)
        return dq, dk, dv, *[None] * 12


def attention(q, k, v, *, causal=False, window_size=(-1, -1), scale=None, layout="bhsd", return_lse=False,
              softcap=0.0, alibi_slopes=None, dropout_p=0.0):
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
        return_lse: also return the log-sum-exp of the scores (after softcap and ALiBi, before dropout), float32,
           natural log.
        softcap: > 0 caps the scaled scores smoothly (Gemma 2): score = softcap * tanh(scale * q.k / softcap);
           0 = off.
        alibi_slopes: float32 (Hq,) or (B, Hq), or None: ALiBi adds -slope * |i + Sk - Sq - j| to the score of
           query row i and key column j (after the scale and the softcap); no gradient flows to the slopes.
        dropout_p: in [0, 1): after the softmax each probability is dropped with probability dropout_p and the kept
           ones are scaled by 1 / (1 - dropout_p) (always, whatever the module's training mode: pass 0 to turn it
           off). The random bits come from Philox in the kernels, seeded by a [seed, offset] drawn from torch's
           default generator of the tensors' device, which every call advances: torch.manual_seed /
           torch.set_rng_state reproduce a call, and `fused_attn.dropout_mask` returns its keep-mask. The backward
           regenerates the mask (nothing of size Sq x Sk is stored); dropout_p = 0 is exactly no dropout.

    Returns:
        out (B, Hq, Sq, Dv) / (B, Sq, Hq, Dv) in the inputs' dtype, or (out, lse).

    Decode steps (at most 16 query rows, fewer batch x heads than SMs, enough keys, no gradient to compute) run the
    split-KV kernels of `attention_with_kvcache` instead of the one-program-per-query-tile grid.
    """
    a = kernel_args(q, k, v, causal, window_size, scale, layout)
    B, Hq, Sq = a.q.shape[:3]
    softcap, alibi_slopes, dropout_p = check_modifiers(B, Hq, a.q.device, softcap, alibi_slopes, dropout_p)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if not grad and dropout_p == 0 and kernels.wants_split(B, Hq, Sq, a.k.shape[2], a.q.device):
        # A decode step: split the keys over programs (the regular grid would leave SMs idle); no stats to save.
        out, lse = ops.decode(a.q, a.k, a.v, None, None, 0, a.k.shape[2], a.scale, a.left, a.right, 0, layout,
                              softcap, alibi_slopes)
    else:
        out, lse = FusedAttentionFunction.apply(a.q, a.k, a.v, a.scale, a.offset, a.left, a.right, layout, None,
                                                None, 0, 0, softcap, alibi_slopes, dropout_p)
    if layout == "bshd":
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out


def attention_probs(q, k, lse, *, causal=False, window_size=(-1, -1), scale=None, layout="bhsd", queries=None,
                    alignment="bottom_right", softcap=0.0, alibi_slopes=None):
    """The attention weights P = exp(score - lse), masked, rebuilt exactly from the kernel's lse for the
    query rows `queries` (a slice or index tensor; default all): (B, Hq, n_queries, Sk), float32; score = q k^T *
    scale with `attention`'s softcap and ALiBi (the probabilities before any dropout).
    Only the selected rows are materialized, so long sequences stay cheap when a few rows are asked for."""
    a = check_args(q, k, k, causal, window_size, scale, layout, alignment)
    softcap, alibi_slopes, _ = check_modifiers(a.q.shape[0], a.q.shape[1], a.q.device, softcap, alibi_slopes)
    scores, visible, rows = row_scores(a, torch.float32, queries, softcap, alibi_slopes)
    lse_rows = lse[:, :, rows, None]
    p = torch.exp(scores - torch.where(torch.isinf(lse_rows), 0.0, lse_rows))
    return torch.where(visible & torch.isfinite(lse_rows), p, 0.0)


def dropout_mask(batch, heads, seqlen_q, seqlen_k, dropout_p, *, seed=None, offset=None, device=None):
    """The boolean keep-mask (batch, heads, seqlen_q, seqlen_k) that the kernels apply for dropout_p (True: kept,
    then scaled by 1 / (1 - dropout_p)), for query head h of batch row b at query row i, key column j.

    seed=None (and offset=None) draws [seed, offset] from torch's default generator of `device` exactly as a kernel
    call with dropout does, so after torch.set_rng_state(s) (torch.cuda.set_rng_state on a GPU) this returns the
    mask of the call made from state s; given explicitly, seed in [0, 2^63) and offset in [0, 2^31). The mask of
    an element depends on neither the head dim nor the layout; packed sequences (attention_varlen) use sequence b's
    own row and column indices, so its mask is dropout_mask(B, Hq, max_seqlen_q, max_seqlen_k)[b, :, :Sq_b, :Sk_b].
    dropout_p = 0 keeps everything (and draws nothing). device: default CUDA if present, else the CPU (which runs the
    Triton kernel through the interpreter)."""
    sizes = [_check_length(n, x) for n, x in (("batch", batch), ("heads", heads), ("seqlen_q", seqlen_q),
                                               ("seqlen_k", seqlen_k))]
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    _, _, dropout_p = check_modifiers(1, 1, device, 0.0, None, dropout_p)
    if (seed is None) != (offset is None):
        raise ValueError("seed and offset must be given together, or both be None (drawn from torch's generator)")
    for name, x, hi in (("seed", seed, 2 ** 63), ("offset", offset, 2 ** 31)):
        if x is not None and (isinstance(x, bool) or not isinstance(x, numbers.Integral) or not 0 <= x < hi):
            raise ValueError(f"{name} must be an int in [0, {hi}), got {x!r}")
    if dropout_p == 0:
        return torch.ones(sizes, dtype=torch.bool, device=device)
    _check_device(torch.empty(0, device=device))
    rng = ops.draw_rng(device) if seed is None else torch.tensor([seed, offset], dtype=torch.int64, device=device)
    return dropout_keep_mask(rng, *sizes, dropout_p)
