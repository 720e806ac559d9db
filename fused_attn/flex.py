"""flex_attention on the Triton kernels: PyTorch FlexAttention's call, masks as BlockMasks (fused_attn.blockmask),
score functions as @triton.jit functions the kernels call (fused_attn.ScoreMod)."""
import torch

from ._args import check_mod_args, kernel_args
from .blockmask import as_block_mask, is_jit
from .function import _attention
from .kernels import Modifiers, ScoreMod
from .replay import CALLS, key_of

_HOW = ("write it as a @triton.jit function score_mod(score, b, h, q_idx, kv_idx, *mod_args) -> score over Triton "
        "tensors (tables it reads go in mod_args, as tensors) and pass fused_attn.ScoreMod(score_mod, grad=dscore) "
        "with dscore(score, b, h, q_idx, kv_idx, *mod_args) its derivative with respect to score")


def check_score_mod(score_mod, mod_args, device):
    """score_mod (a ScoreMod, a @triton.jit function, or None) and its mod_args -> (ScoreMod or None, tuple)."""
    args = tuple(mod_args)
    if score_mod is None:
        if args:
            raise ValueError("mod_args are score_mod's extra arguments: pass a score_mod with them")
        return None, args
    mod = score_mod if isinstance(score_mod, ScoreMod) else ScoreMod(score_mod)
    if not is_jit(mod.fn):
        raise TypeError(f"score_mod {getattr(mod.fn, '__name__', mod.fn)!r} is a Python function; the kernels call "
                        f"score functions compiled with them: {_HOW}")
    if mod.grad is not None and not is_jit(mod.grad):
        raise TypeError(f"ScoreMod's grad must be a @triton.jit function, got {type(mod.grad).__name__}")
    return mod, check_mod_args(args, device, "a score_mod")


def flex_attention(query, key, value, score_mod=None, block_mask=None, scale=None, enable_gqa=False,
                   return_lse=False, *, mod_args=()):
    """PyTorch FlexAttention's flex_attention with its semantics, on the Triton kernels (forward and deterministic
    backward):

        out = softmax(score_mod(q k^T * scale), the pairs block_mask hides removed) v

    Args:
        query (B, Hq, Sq, D), key (B, Hkv, Sk, D), value (B, Hkv, Sk, Dv): float16 / bfloat16 / float32, any strides;
            Hq != Hkv needs enable_gqa=True (query head h reads kv head h // (Hq / Hkv)). key / value with batch 1
            serve every query batch row (PyTorch's broadcast; their gradients sum over the rows).
        score_mod: None, a @triton.jit function `score_mod(score, b, h, q_idx, kv_idx, *mod_args) -> score` or a
            fused_attn.ScoreMod(score_mod, grad=dscore). The kernels call it on every block they visit, with the
            scaled scores (float32) of query rows q_idx, keys kv_idx of batch row b, query head h (broadcastable
            Triton tensors); -inf removes a pair. The backward needs dscore(score, b, h, q_idx, kv_idx, *mod_args),
            d(new score) / d(score) elementwise: without it a call whose inputs require grad raises a ValueError.
            No gradient flows to mod_args (a learned bias: fused_attn.attention's attn_mask). A Python (torch)
            score function raises a TypeError: the kernels cannot call it.
        block_mask: a fused_attn.BlockMask (create_block_mask, BlockMask.from_kv_blocks) or PyTorch's (its block
            lists, with its mask_mod inside the partial ones, converted into ours on first use and cached with the
            object: a mask made once serves every layer), for (1 or B, 1 or Hq, Sq, Sk); None: every key.
            The kernels skip the blocks it leaves empty and run the full ones without mask arithmetic.
        scale: default 1 / sqrt(D).
        return_lse: also return the log-sum-exp (B, Hq, Sq), float32, natural log.
        mod_args: score_mod's extra arguments after kv_idx: tensors (on the inputs' device; pointers in the
            function), ints, floats. New values never recompile; a new score_mod compiles the kernels once.

    Returns out (B, Hq, Sq, Dv) in the query's memory order (PyTorch's), and the lse with return_lse:
    differentiable, as PyTorch's (a loss that uses it gets its gradient through q and k).
    Rows that see no key get out 0 and lse -inf (and no gradient). Calls with a @triton.jit function launch the
    kernels directly, not through the custom ops: torch.compile breaks its graph there."""
    checked = (lambda: _flex(query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse, mod_args))
    if torch.compiler.is_compiling() or type(mod_args) is not tuple:
        return checked()
    # A layout's later calls: its recorded launches again (fused_attn/replay.py), keyed also by the score
    # function, the mask's blocks and function and the arguments that are not tensors.
    values, tensors = _split(mod_args)
    mask = ((), ()) if block_mask is None else _mask_key(block_mask)
    if mask is None:
        return checked()
    return CALLS(key_of("flex", score_mod, scale, enable_gqa, return_lse, values, mask[0]),
                 (query, key, value, *tensors, *mask[1]), checked)


def _split(values: tuple):
    """(the values that are not tensors, with None where a tensor is; the tensors)."""
    return (tuple(None if isinstance(x, torch.Tensor) else (type(x), x) for x in values),
            tuple(x for x in values if isinstance(x, torch.Tensor)))


def _mask_key(block_mask):
    """A block mask as a replay's key sees it: ((its sizes, blocks, mask function and non-tensor arguments), its
    tensors), or None where it is not a BlockMask (the checked path says why)."""
    try:
        bm = as_block_mask(block_mask)
    except TypeError:
        return None
    tables = bm.tables
    values, tensors = _split(tuple(tables.mask_args))
    return ((tables.block_q, tables.block_k, tables.mask_mod, values, bm.shape),
            (tables.kv, tables.kv_slots, tables.q, tables.q_slots, tables.bits, *tensors))


def _flex(query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse, mod_args):
    """flex_attention's checked path."""
    if not isinstance(enable_gqa, bool) or not isinstance(return_lse, bool):
        raise TypeError(f"enable_gqa and return_lse must be bools, got {enable_gqa!r}, {return_lse!r}")
    if all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (query, key, value)) and \
            key.shape[0] == value.shape[0] == 1 != query.shape[0]:  # one key / value batch for every query batch
        key, value = (t.expand(query.shape[0], *t.shape[1:]) for t in (key, value))
    a = kernel_args(query, key, value, scale=scale)
    (B, Hq, Sq), (Hkv, Sk) = a.q.shape[:3], a.k.shape[1:3]
    if Hq != Hkv and not enable_gqa:
        raise ValueError(f"query has {Hq} heads and key / value {Hkv}: pass enable_gqa=True for grouped-query "
                         f"attention")
    mod, args = check_score_mod(score_mod, mod_args, a.q.device)
    if (mod is not None and mod.grad is None and torch.is_grad_enabled()
            and any(t.requires_grad for t in (query, key, value))):
        raise ValueError(f"score_mod {mod.fn.__name__!r} has no derivative for the backward: pass "
                         f"fused_attn.ScoreMod({mod.fn.__name__}, grad=...) (see flex_attention's docstring), or "
                         f"call it under torch.no_grad()")
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
    out, lse = _attention(a, Modifiers(score_mod=mod, score_args=args), blocks=blocks)
    return (out, lse) if return_lse else out
