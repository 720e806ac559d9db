"""The autograd Function over the Triton ops, the one internal call into it (`_attention`), and the public
attention()."""
import dataclasses
import numbers

import torch

from . import kernels, ops
from ._args import (Args, _check_length, check_args, check_attn_mask, check_device, check_fp8, check_modifiers,
                    kernel_args)
from .blockmask import from_dense
from .kernels import BlockTables, Modifiers, Packed, dropout_keep_mask
from .ops import Call
from .mask import visible_rows
from .reference import row_scores
from .replay import CALLS, key_of


class FusedAttentionFunction(torch.autograd.Function):
    """(q, k, v, bias, sinks, call): (B, H, S, D)-indexed views of any strides, the call's float bias (call.mods.bias,
    an expanded (B, Hq, Sq, Sk) view, or None), its sinks (call.mods.sinks or None) and an ops.Call -> out (B, Hq,
    Sq, Dv) laid out as call.layout and lse (B, Hq, Sq) float32, both differentiable. Saves q, k, v, out, the
    softmax stats, dropout's [seed, offset] (not its mask: the backward draws the same mask again) and every other
    tensor the backward reads (the call's bias, sinks, slopes, tables, cu_seqlens), so that autograd's version check
    raises when one is modified in place before the backward; forward and backward run the Triton kernels (under
    torch.compile through the custom ops fused_attn::forward / fused_attn::backward, fused_attn/ops.py; directly in
    eager mode, the same bits). The bias's gradient is the dS the
    dQ kernel writes once per element; autograd's expand backward sums it over the dimensions the bias broadcasts
    over. The sinks' gradient is summed from per-row terms (ops). A gradient of the lse joins the backward's delta
    (kernels.backward): no extra pass."""

    @staticmethod
    def forward(ctx, q, k, v, bias, sinks, call: Call):
        out, lse, stats, rng = ops.attention_forward(q, k, v, call)
        ctx.save_for_backward(q, k, v, out, stats, rng, *call.tensors())
        ctx.call = call
        ctx.set_materialize_grads(False)  # an unused lse brings no gradient (and no extra kernel work)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, stats, rng = ctx.saved_tensors[:6]  # reading them runs the version check of every one
        if dout is None:
            dout = torch.zeros_like(out)
        bias_grad = ctx.needs_input_grad[3]
        dq, dk, dv, dbias, dsinks = ops.attention_backward(dout, q, k, v, out, stats, rng, ctx.call, bias_grad, dlse)
        return (dq, dk, dv, dbias.to(ctx.call.mods.bias.dtype) if bias_grad else None,
                dsinks if ctx.needs_input_grad[4] else None, None)


def _attention(a: Args, mods: Modifiers = Modifiers(), packed: Packed = None, blocks: BlockTables = None,
               out_dtype=None):
    """The one call into the kernels for every entry point that computes attention over q, k, v (attention,
    attention_varlen, flex_attention, the drop-ins): checked Args and Modifiers (and Packed sequences, or a block
    mask's tables) -> (out, lse) as the ops return them, out laid out as a.layout, (B, Hq, Sq)-indexed. Decode steps
    (at most 16 query rows, fewer batch x heads than SMs, enough keys, no gradient to compute, no dropout, no
    block mask) take the split-KV kernels."""
    B, Hq, Sq = a.q.shape[:3]
    call = Call.of(a, mods, packed, blocks, out_dtype)
    if mods.q_descale is not None:  # FP8 inputs: forward only (check_fp8 refused gradients)
        out, lse, _, _ = ops.attention_forward(a.q, a.k, fp8_values(a.v), call)
        return out, lse
    # Whether autograd needs the backward: any input that takes a gradient, not the shape, decides the path.
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (a.q, a.k, a.v, mods.bias, mods.sinks))
    bottom_right = a.offset == a.k.shape[2] - Sq or a.left < 0 and a.right < 0  # the split kernels' alignment
    if (packed is None and blocks is None and not grad and not mods.dropout_p and mods.bias is None
            and mods.score_mod is None and bottom_right and kernels.wants_split(B, Hq, Sq, a.k.shape[2], a.q.device)):
        return ops.attention_decode(a.q, a.k, a.v, call)
    return FusedAttentionFunction.apply(a.q, a.k, a.v, mods.bias, mods.sinks, call)


def fp8_values(v):
    """v (B, H, S, D)-indexed with the keys contiguous: FP8 tensor cores take P.V's second operand K-major (keys
    contiguous in shared memory), which a (.., S, D)-contiguous V is not -- Triton would load it synchronously to
    transpose it. So FP8 V is copied once, transposed (one pass over V's bytes; FlashAttention-3 transposes in the
    kernel instead), unless it is laid out so already."""
    return v if v.stride(2) == 1 else v.transpose(2, 3).contiguous().transpose(2, 3)


def attention(q, k, v, *, causal=False, window_size=(-1, -1), scale=None, layout="bhsd", return_lse=False,
              softcap=0.0, alibi_slopes=None, dropout_p=0.0, attn_mask=None, sinks=None, q_descale=None,
              k_descale=None, v_descale=None, out_dtype=None):
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
           natural log; differentiable (a loss that uses it, e.g. merging partial results by their lse or a z-loss,
           gets its gradient).
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
        attn_mask: None, or a tensor broadcastable to (B, Hq, Sq, Sk) -- in both layouts -- combined with causal /
           window_size (both must let a pair take part), SDPA's conventions:
           - bool: True where the pair takes part;
           - float16 / bfloat16 / float32: an additive bias on the scaled scores (after softcap and ALiBi), -inf
             where the pair takes no part. If it requires grad it gets its gradient, deterministic, shaped like
             it (summed over the dimensions it broadcasts over); computing it takes a float32 (B, Hq, Sq, Sk)
             buffer in the backward.
           It is classified into blocks on the device once per call, into fixed-size tables (no value read on the
           host, so the call can be captured in a CUDA graph; fused_attn.create_block_mask's lists): blocks it leaves
           empty (all False / -inf) are skipped, full ones run without mask arithmetic. Rows that see nothing:
           out 0, lse -inf.
        sinks: None, or float32 (Hq,) on the tensors' device: attention sinks (gpt-oss; StreamingLLM's sink as a
           learned logit), one logit per query head that joins each row's softmax denominator and contributes
           nothing to the output, in the units of the scaled scores (not scaled again, not softcapped, no ALiBi):
           P_ij = exp(s_ij) / (exp(sink_h) + sum_j exp(s_ij)). The lse includes it; a row that sees no key gets
           out 0 (and lse = sink_h). If it requires grad it gets its gradient, deterministic.
        q_descale, k_descale, v_descale, out_dtype: FP8 attention (FlashAttention-3's FP8 forward), forward only:
           q, k, v in torch.float8_e4m3fn (GPUs from sm_89 on) or float8_e5m2, all alike, standing for q * q_descale,
           k * k_descale, v * v_descale with descales float32 (B, Hkv) -- query head h takes its kv head's -- or
           one value (`fused_attn.quantize_fp8` makes them). Both products run on FP8 tensor cores: the scores in
           fp32 (times q_descale * k_descale, then softcap, ALiBi, the softmax in fp32 as usual), and P rounded to
           FP8 for P.V, as FlashAttention-3 does -- that costs up to a relative 2^-4 (e4m3; 2^-3 for e5m2) of each
           probability and flushes those below about 2^-10 (2^-17) of the row's largest: errors of a few percent of
           |v| where attention is spread thin (fused_attn.numerics: the FP8 rule). out_dtype: bfloat16 (default),
           float16 or float32. Causal, windows, GQA, softcap, ALiBi and sinks work; dropout, attn_mask and inputs
           that require grad raise a ValueError.

    Returns:
        out (B, Hq, Sq, Dv) / (B, Sq, Hq, Dv) in the inputs' dtype, in q's memory order (as PyTorch's attention
        keeps the query's stride order), or (out, lse).

    Decode steps (at most 16 query rows, fewer batch x heads than SMs, enough keys, no gradient to compute) run the
    split-KV kernels of `attention_with_kvcache` instead of the one-program-per-query-tile grid.
    """
    def checked():
        a = kernel_args(q, k, v, causal=causal, window_size=window_size, scale=scale, layout=layout, fp8=True)
        mods = check_modifiers(a.q.shape[0], a.q.shape[1], a.q.device, softcap=softcap, alibi_slopes=alibi_slopes,
                               dropout_p=dropout_p, sinks=sinks)
        mods, dtype = check_fp8(a, mods, a.q.shape[0], dict(q_descale=q_descale, k_descale=k_descale,
                                                             v_descale=v_descale), out_dtype, attn_mask)
        mods, blocks = masked(a, mods, attn_mask)
        out, lse = _attention(a, mods, blocks=blocks, out_dtype=dtype)
        if layout == "bshd":
            out = out.transpose(1, 2)
        return (out, lse) if return_lse else out

    if attn_mask is None and not dropout_p and type(window_size) is tuple and not torch.compiler.is_compiling():
        # A layout's later calls: its recorded launches again (fused_attn/replay.py).
        return CALLS(key_of("attention", causal, *window_size, scale, layout, return_lse, softcap, out_dtype),
                     (q, k, v, alibi_slopes, sinks, q_descale, k_descale, v_descale), checked)
    return checked()


def masked(a: Args, mods: Modifiers, attn_mask):
    """(Modifiers, block tables or None) of a call with attn_mask (broadcastable to (B, Hq, Sq, Sk)) and the window
    of checked Args: both must let a pair take part, and the block lists skip the blocks the two leave empty. A
    bool mask is all in the lists (its partial blocks' bits); a float one is also the Modifiers' bias, expanded to
    (B, Hq, Sq, Sk) (a view), its -inf entries the mask of the lists."""
    if attn_mask is None:
        return mods, None
    B, Hq, Sq = a.q.shape[:3]
    Sk = a.k.shape[2]
    check_attn_mask(attn_mask, (B, Hq, Sq, Sk), a.q.device)
    visible = (lambda rows: visible_rows(rows, Sk, a.left, a.right, a.offset))
    if attn_mask.dtype == torch.bool:
        return mods, from_dense(attn_mask, B, Hq, Sq, Sk, visible).tables
    with torch.no_grad():
        blocks = from_dense(attn_mask != float("-inf"), B, Hq, Sq, Sk, visible).tables
    bias = attn_mask[(None,) * (4 - attn_mask.dim())].expand(B, Hq, Sq, Sk)
    return dataclasses.replace(mods, bias=bias), blocks


def attention_probs(q, k, lse, *, causal=False, window_size=(-1, -1), scale=None, layout="bhsd", queries=None,
                    alignment="bottom_right", softcap=0.0, alibi_slopes=None, sinks=None):
    """The attention weights P = exp(score - lse), masked, rebuilt exactly from the kernel's lse for the
    query rows `queries` (a slice or index tensor; default all): (B, Hq, n_queries, Sk), float32; score = q k^T *
    scale with `attention`'s softcap and ALiBi (the probabilities before any dropout).
    Only the selected rows are materialized, so long sequences stay cheap when a few rows are asked for. sinks: the
    call's attention sinks, if it had any (its lse includes them, so the weights need nothing more; they are
    checked)."""
    a = check_args(q, k, k, causal=causal, window_size=window_size, scale=scale, layout=layout, alignment=alignment)
    mods = check_modifiers(a.q.shape[0], a.q.shape[1], a.q.device, softcap=softcap, alibi_slopes=alibi_slopes,
                           sinks=sinks)
    scores, visible, rows = row_scores(a, torch.float32, queries, mods.softcap, mods.alibi_slopes)
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
    dropout_p = check_modifiers(1, 1, device, dropout_p=dropout_p).dropout_p
    if (seed is None) != (offset is None):
        raise ValueError("seed and offset must be given together, or both be None (drawn from torch's generator)")
    for name, x, hi in (("seed", seed, 2 ** 63), ("offset", offset, 2 ** 31)):
        if x is not None and (isinstance(x, bool) or not isinstance(x, numbers.Integral) or not 0 <= x < hi):
            raise ValueError(f"{name} must be an int in [0, {hi}), got {x!r}")
    if dropout_p == 0:
        return torch.ones(sizes, dtype=torch.bool, device=device)
    check_device(device)
    rng = ops.draw_rng(device) if seed is None else torch.tensor([seed, offset], dtype=torch.int64, device=device)
    return dropout_keep_mask(rng, *sizes, dropout_p)


def rng_state(device):
    """The state of torch's default generator of `device` (CPU or CUDA)."""
    device = torch.device(device)
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def set_rng_state(state, device):
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def with_keep_mask(call, dropout_p, device, shape):
    """(call()'s result, the dropout keep-mask `shape` = (B, Hq, Sq, Sk) its kernels drew, or None without dropout):
    the mask is drawn again from the generator's state before the call (dropout_mask), which is then put back to
    where the call left it."""
    if not dropout_p:
        return call(), None
    before = rng_state(device)
    result = call()
    after = rng_state(device)
    set_rng_state(before, device)
    try:
        keep = dropout_mask(*shape, dropout_p, device=device)
    finally:
        set_rng_state(after, device)
    return result, keep
