"""flex_attention on the Triton kernels: PyTorch FlexAttention's call, masks as BlockMasks (fused_attn.blockmask)."""
from ._args import kernel_args
from .blockmask import as_block_mask
from .function import _attention
from .kernels import Modifiers


def flex_attention(query, key, value, score_mod=None, block_mask=None, scale=None, enable_gqa=False,
                   return_lse=False, *, mod_args=()):
    """PyTorch FlexAttention's flex_attention with its semantics, on the Triton kernels (forward and deterministic
    backward):

        out = softmax(q k^T * scale, the pairs block_mask hides removed) v

    Args:
        query (B, Hq, Sq, D), key (B, Hkv, Sk, D), value (B, Hkv, Sk, Dv): float16 / bfloat16 / float32, any strides;
            Hq != Hkv needs enable_gqa=True (query head h reads kv head h // (Hq / Hkv)).
        block_mask: a fused_attn.BlockMask (create_block_mask) or one made by PyTorch's create_block_mask
            (converted once: its mask_mod is evaluated into ours), for (1 or B, 1 or Hq, Sq, Sk); None: every key.
            The kernels skip the blocks it leaves empty and run the full ones without mask arithmetic.
        scale: default 1 / sqrt(D).
        return_lse: also return the log-sum-exp (B, Hq, Sq), float32, natural log.
        score_mod, mod_args: not implemented yet (NotImplementedError); the built-in causal / window / softcap /
            ALiBi of fused_attn.attention cover the common score and mask functions on faster paths.

    Rows that see no key get out 0 and lse -inf (and no gradient)."""
    if score_mod is not None:
        raise NotImplementedError("fused_attn.flex_attention does not implement score_mod yet")
    if mod_args:
        raise NotImplementedError("fused_attn.flex_attention does not implement mod_args yet (they are for "
                                  "@triton.jit mask and score functions)")
    if not isinstance(enable_gqa, bool) or not isinstance(return_lse, bool):
        raise TypeError(f"enable_gqa and return_lse must be bools, got {enable_gqa!r}, {return_lse!r}")
    a = kernel_args(query, key, value, scale=scale)
    (B, Hq, Sq), (Hkv, Sk) = a.q.shape[:3], a.k.shape[1:3]
    if Hq != Hkv and not enable_gqa:
        raise ValueError(f"query has {Hq} heads and key / value {Hkv}: pass enable_gqa=True for grouped-query "
                         f"attention")
    blocks = None
    if block_mask is not None:
        bm = as_block_mask(block_mask)
        mb, mh, mq, mk = bm.shape
        if (mq, mk) != (Sq, Sk) or mb not in (1, B) or mh not in (1, Hq):
            raise ValueError(f"block_mask is for (B, H, Q_LEN, KV_LEN) = {bm.shape}, the inputs are (B, Hq, Sq, Sk) = "
                             f"{(B, Hq, Sq, Sk)} (B and H of the mask may be 1: broadcast)")
        if bm.tables.kv.device != a.q.device:
            raise ValueError(f"block_mask is on {bm.tables.kv.device}, the inputs on {a.q.device}")
        blocks = bm.tables
    out, lse = _attention(a, Modifiers(), blocks=blocks)
    return (out, lse) if return_lse else out
