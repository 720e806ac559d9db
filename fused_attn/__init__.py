"""fused_attn: FlashAttention-style attention as hand-written Triton kernels for PyTorch."""
import importlib

from . import reference
from .batch_invariant import is_batch_invariant_mode, set_batch_invariant_mode
from .blockmask import BlockMask, and_masks, create_block_mask, or_masks
from .decode import attention_with_kvcache, write_kv_cache
from .dropin import (explain, flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache,
                     scaled_dot_product_attention, sdpa_override)
from .flex import flex_attention
from .fp8 import quantize_fp8
from .function import FusedAttentionFunction, attention, attention_probs, dropout_mask
from .kernels import ScoreMod
from .merge import merge_attention
from .schedule import SchedulerMetadata, get_scheduler_metadata
from .varlen import attention_varlen, cu_seqlens

__version__ = "0.1.0"
__all__ = ["attention", "attention_varlen", "attention_with_kvcache", "write_kv_cache", "attention_probs",
           "dropout_mask", "merge_attention", "cu_seqlens", "FusedAttentionFunction", "reference",
           "scaled_dot_product_attention", "sdpa_override", "explain", "flash_attn_func", "flash_attn_varlen_func",
           "flash_attn_with_kvcache", "flex_attention", "create_block_mask", "BlockMask", "and_masks", "or_masks",
           "ScoreMod", "quantize_fp8", "get_scheduler_metadata", "SchedulerMetadata", "set_batch_invariant_mode",
           "is_batch_invariant_mode"]


def __getattr__(name):  # submodules with heavier imports (matplotlib, transformers, distributed) load on first use
    if name in ("viz", "integrations", "distributed"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fused_attn' has no attribute {name!r}")
