"""Triton kernels and their launchers (installed as fused_attn.kernels). No autograd, no argument policy.

common.py: the device helpers every kernel shares (the mask, the block range, score modifiers, loads);
forward.py, backward.py, decode.py: the kernels and their launchers; cache.py: writing a paged KV cache;
blockmask.py: a @triton.jit mask function's block counts; launch.py: what the launchers share (the optional
inputs' bundles and flags, tile sources, the launch counter); configs.py: tiles, warps and stages."""
from .backward import attention_backward
from .blockmask import count_visible
from .cache import write_kv
from .configs import interpreter_active
from .decode import attention_decode, wants_split
from .forward import attention_forward, dropout_keep_mask
from .launch import BlockTables, Modifiers, Packed, ScoreMod, launches

__all__ = ["attention_forward", "attention_backward", "attention_decode", "dropout_keep_mask", "wants_split",
           "interpreter_active", "launches", "BlockTables", "Modifiers", "Packed", "ScoreMod", "count_visible",
           "write_kv"]
