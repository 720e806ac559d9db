"""Hugging Face transformers: `register()` adds an attention implementation named "fused_attn", so

    fused_attn.integrations.transformers.register()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="fused_attn")

runs the Triton kernels for causal (bottom-right aligned, so decoding with a KV cache is exact too), GQA
(k / v are not repeated) and Mistral-style sliding windows (HF's sliding_window=W is window_size=(W - 1, 0)).

What the registered mask function hands the attention function, and what then runs:
- None: no padding, the queries are the last positions of the keys (training, prefill, decoding with a dynamic
  cache) -> `fused_attn.attention` on the batch as it is.
- the (B, kv_length) boolean padding mask, where each row's tokens are one contiguous run (left or right
  padding) -> the tokens are unpadded into the packed layout, `attention_varlen` runs, the output is padded back
  (padded query positions get 0).
- a (B, S) int64 tensor of sequence ids, for padding-free packed batches (position_ids that restart per sequence),
  after checking that transformers' own mask is exactly "causal (and the config's sliding window) within each
  sequence" -> `attention_varlen` over the sequences. The `cu_seq_lens_q / cu_seq_lens_k / max_length_q /
  max_length_k` keyword arguments of flattened batches (DataCollatorWithFlattening) are used as given, as
  FlashAttention does.
- anything else (chunked attention, bidirectional / token-type overlays, holes in the padding, static caches,
  packed position ids whose mask is more than causal-within-sequences): transformers' mask function itself,
  evaluated into a fused_attn.BlockMask (block lists; partial blocks' bits) in chunks of query blocks -- no
  (B, 1, Sq, Sk) mask is materialized -- and run by the kernels over those lists.
- a 4-D mask the user passes to the model (transformers hands it through unchanged): bool or float, it runs on
  the kernels as `attention(..., attn_mask=)` does.
Every mask transformers makes or passes runs on the kernels; an attention_mask of any other form raises a
TypeError naming it (no fallback).

Attention dropout (training mode with attention_dropout > 0) and logit softcapping (Gemma 2's
attn_logit_softcapping) run in the kernels on every path above (dropout with the kernels' own Philox stream).
"""
import logging

import torch

from .._args import check_modifiers, kernel_args
from ..blockmask import BlockMask, _classify, _vmapped
from ..function import _attention, attention
from ..varlen import attention_varlen

NAME = "fused_attn"
log = logging.getLogger("fused_attn")


def _contiguous_rows(padding: torch.Tensor) -> bool:
    """Each row's kept tokens form one run (left or right padding, no holes)."""
    kept = padding.sum(-1, keepdim=True)
    first = padding.int().argmax(-1, keepdim=True)
    cols = torch.arange(padding.shape[-1], device=padding.device)
    return bool(((cols >= first) & (cols < first + kept)).eq(padding).all())


def _sequence_ids(mask: torch.Tensor, config):
    """(B, S) int64 sequence ids if the 4-D boolean mask (B, 1, S, S) is exactly causal within runs of rows (and
    the config's sliding window, if that is what the mask has), else None."""
    if mask.dim() != 4 or mask.dtype != torch.bool or mask.shape[1] != 1 or mask.shape[2] != mask.shape[3]:
        return None
    m = mask[:, 0]
    S = m.shape[-1]
    i = torch.arange(S, device=m.device)
    # A row starts a sequence where it cannot see the key just before it.
    starts = torch.ones(m.shape[:2], dtype=torch.bool, device=m.device)
    starts[:, 1:] = ~m[:, i[1:], i[1:] - 1]
    ids = starts.long().cumsum(-1) - 1
    same = ids[:, :, None] == ids[:, None, :]
    causal = same & (i[None, :, None] >= i[None, None, :])
    if torch.equal(m, causal):
        return ids
    window = getattr(config, "sliding_window", None)
    if window and torch.equal(m, causal & (i[None, :, None] - i[None, None, :] < window)):
        return ids
    return None


def fused_attn_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None,
                    allow_is_causal_skip=True, local_size=None, **kwargs):
    """transformers mask function: None, a 2-D padding mask, (B, S) sequence ids, or a BlockMask (module
    docstring)."""
    from transformers.masking_utils import sdpa_mask
    if isinstance(attention_mask, BlockMask):  # made for this step already (generate's static-cache path)
        return attention_mask
    aligned = not isinstance(q_offset, torch.Tensor) and q_offset + q_length == kv_offset + kv_length
    # Chunked attention (Llama 4) passes its chunk size as local_size, sliding windows their window.
    chunk = getattr(kwargs.get("config"), "attention_chunk_size", None)
    chunked = chunk is not None and local_size == chunk and kv_offset + kv_length > chunk
    padding = None if attention_mask is None else attention_mask[:, kv_offset:kv_offset + kv_length].bool()
    if allow_is_causal_skip and aligned and not chunked:
        if padding is None or padding.all():
            return None
        if padding.shape[-1] == kv_length and _contiguous_rows(padding):
            return padding
    packed = attention_mask is None and aligned and not chunked and q_offset == 0 and q_length == kv_length
    if packed:  # position ids that restart: packed sequences?
        mask = sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask=attention_mask,
                         allow_is_causal_skip=False, local_size=local_size, **kwargs)
        ids = _sequence_ids(mask, kwargs.get("config")) if isinstance(mask, torch.Tensor) else None
        if ids is not None:
            return ids
    return block_mask(batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask=attention_mask,
                      **kwargs)


def block_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
               use_vmap=False, device="cpu", block_size=128, **kwargs) -> BlockMask:
    """transformers' mask function (default causal) and 2-D padding mask as a BlockMask over (batch_size, 1,
    q_length, kv_length): evaluated at query positions q_offset.. and key positions kv_offset.., by broadcasting
    index tensors as transformers' sdpa_mask does (or with torch.vmap where it asks, use_vmap: custom functions)."""
    from transformers.masking_utils import (and_masks, causal_mask_function, padding_mask_function,
                                            prepare_padding_mask)
    fn = mask_function or causal_mask_function
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is not None:
        fn = and_masks(fn, padding_mask_function(padding))
    device = torch.device(device)
    b = torch.arange(batch_size, device=device)
    h = torch.zeros(1, dtype=torch.long, device=device)
    kv = torch.arange(kv_length, device=device) + kv_offset

    def rows_mask(rows):
        q = rows + q_offset
        if use_vmap:
            return _vmapped(fn, 0)(b, h, q, kv).bool()
        out = fn(b[:, None, None, None], h[None, :, None, None], q[None, None, :, None], kv[None, None, None, :])
        return out.bool().expand(batch_size, 1, len(rows), kv_length)
    return _classify(rows_mask, batch_size, 1, q_length, kv_length, (block_size, block_size), device)


def _cu_seqlens(lengths: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)


def _varlen(query, key, value, rows_q, rows_k, cu_q, cu_k, max_q, max_k, **kw):
    """attention_varlen on the (B, S, H, D) tokens selected by the flat row indices; out padded back to
    (B, Sq, Hq, Dv) with zeros where no query was selected."""
    B, Sq = query.shape[:2]
    pack = (lambda t, rows: t.reshape(-1, *t.shape[2:]).index_select(0, rows))
    out = attention_varlen(pack(query, rows_q), pack(key, rows_k), pack(value, rows_k), cu_q, cu_k, max_q, max_k,
                           **kw)
    full = out.new_zeros(B * Sq, *out.shape[1:]).index_copy(0, rows_q, out)
    return full.view(B, Sq, *out.shape[1:])


def _padded(query, key, value, padding, **kw):
    """Left / right padded batch: keys are the kept tokens of each row, queries the last Sq positions' kept ones."""
    Sq, Sk = query.shape[1], key.shape[1]
    keep_q = padding[:, Sk - Sq:]
    rows = [m.flatten().nonzero().flatten() for m in (keep_q, padding)]
    lengths = [m.sum(-1) for m in (keep_q, padding)]
    return _varlen(query, key, value, *rows, *map(_cu_seqlens, lengths), *(int(n.max()) for n in lengths), **kw)


def _packed(query, key, value, cu_q, cu_k, max_q, max_k, **kw):
    """Padding-free packed tokens: every row of (B, S) is one run of sequences; the rows, flattened, are the packed
    layout already (views where the strides allow, nothing selected or scattered)."""
    flat = (lambda t: t.reshape(-1, *t.shape[2:]))
    out = attention_varlen(flat(query), flat(key), flat(value), cu_q.to(torch.int32), cu_k.to(torch.int32),
                           int(max_q), int(max_k), **kw)
    return out.view(*query.shape[:2], *out.shape[1:])


def _from_ids(ids: torch.Tensor):
    """cu_seqlens and max length of the sequences given as (B, S) ids, rows flattened one after the other."""
    flat = ids + (ids.amax(-1, keepdim=True) + 1).cumsum(0) - ids.amax(-1, keepdim=True) - 1
    lengths = torch.unique_consecutive(flat.flatten(), return_counts=True)[1]
    return _cu_seqlens(lengths), int(lengths.max())


def kernel_kwargs(module, is_causal=None, sliding_window=None, scaling=None, softcap=None, dropout=0.0,
                  sinks=None) -> dict:
    """The kernels' mask and modifier arguments for a transformers attention call: causal from the call or the
    module, HF's sliding_window=W as window_size=(W - 1, 0), attention sinks (gpt-oss's s_aux) as float32."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    return dict(causal=causal, window_size=(sliding_window - 1 if sliding_window else -1, 0 if causal else -1),
                scale=scaling, softcap=softcap or 0.0, dropout_p=dropout,
                sinks=None if sinks is None else sinks.float())


def fused_attn_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                       sliding_window=None, softcap=None, cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None,
                       max_length_k=None, s_aux=None, **kwargs):
    """transformers attention function: (B, Hq, S, D) query, (B, Hkv, S, D) key / value -> ((B, S, Hq, Dv), None)."""
    kw = kernel_kwargs(module, is_causal, sliding_window, scaling, softcap, dropout, s_aux)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, S, H, D)
    if isinstance(attention_mask, BlockMask):  # transformers' mask function: it holds the band
        log.debug("transformers attention -> fused_attn kernels over the mask function's block lists")
        a = kernel_args(q, k, v, scale=scaling, layout="bshd")
        mods = check_modifiers(a.q.shape[0], a.q.shape[1], a.q.device, softcap=kw["softcap"],
                               dropout_p=kw["dropout_p"], sinks=kw["sinks"])
        out, _ = _attention(a, mods, blocks=attention_mask.tables)
        return out.transpose(1, 2).contiguous(), None
    if not (attention_mask is None or (attention_mask.dim() == 2 and attention_mask.dtype in (torch.bool, torch.int64))
            or attention_mask.dim() == 4):
        raise TypeError(f"fused_attn's attention function takes the masks its mask function makes (None, a 2-D "
                        f"padding mask, sequence ids, a BlockMask) or a 4-D mask; got {attention_mask.dtype} "
                        f"{tuple(attention_mask.shape)}")
    if attention_mask is not None and attention_mask.dim() == 4:  # a user's mask: it holds the band
        log.debug("transformers attention -> fused_attn kernels with the 4-D mask")
        kw.update(causal=False, window_size=(-1, -1))
        return attention(q, k, v, layout="bshd", attn_mask=attention_mask, **kw).contiguous(), None
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        return _padded(q, k, v, attention_mask, **kw), None
    if attention_mask is not None:  # sequence ids of a packed batch
        cu, longest = _from_ids(attention_mask)
        return _packed(q, k, v, cu, cu, longest, longest, **kw), None
    if all(x is not None for x in (cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k)):
        return _packed(q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, **kw), None
    return attention(q, k, v, layout="bshd", **kw).contiguous(), None


def register(name: str = NAME) -> str:
    """Register the attention and mask functions with transformers under `name`; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(name, fused_attn_forward)
    AttentionMaskInterface.register(name, fused_attn_mask)
    return name
