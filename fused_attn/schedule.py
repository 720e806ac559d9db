"""Plans made once per step: get_scheduler_metadata (FlashAttention-3's call, as vLLM's FlashAttention backend
makes it once per step and hands to every layer) and the check a per-layer call makes against its plan."""
import numbers
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import batch_invariant
from .replay import Replays
from ._args import (DTYPES, _check_cu_seqlens, _check_int32_rows, _check_length, _check_num_splits,
                    _check_window, check_cu_values, reads_values)
from .kernels.decode import DecodePlan, decode_plan


@dataclass(frozen=True)
class SchedulerMetadata:
    """A step's plan for its split-KV calls (attention_with_kvcache, attention_varlen over a KV cache and their
    FlashAttention drop-ins): what every layer's call would otherwise redo -- the split plan, the tiles, the scratch
    for split partials (shared by the layers: their launches run one after another on a stream), the value checks
    of the step's lengths. Made by get_scheduler_metadata; opaque to the caller (not a tensor, unlike
    FlashAttention-3's: hand it to the calls as it is, e.g. `scheduler_metadata=meta`)."""
    batch_size: int
    max_seqlen_q: int
    max_seqlen_k: int
    num_heads_q: int
    num_heads_kv: int
    headdim: int
    headdim_v: int
    dtype: torch.dtype
    device: torch.device
    packed: bool  # made with cu_seqlens_q: the packed (varlen / serving) call; else attention_with_kvcache's
    page_size: int  # 0: contiguous caches
    plan: DecodePlan
    # The per-layer calls' replays (fused_attn/replay.py): `meta.replays(key, tensors, checked_call)` runs the
    # checked call the first time a layout comes, its launches recorded, and after that the same launches on the
    # next calls' tensors, into new outputs -- nothing checked, planned or built but the key; the plan's scratch
    # is kept by every replay.
    replays: Replays = field(init=False, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "replays", Replays(MAX_REPLAYS, sightings=0, fixed=self.plan.scratch))

    @property
    def split_keys(self) -> int:
        """The batch-invariant mode's keys per split the plan was made in (0: made outside the mode)."""
        return self.plan.split_keys

    def check(self, fn: str, q, k_cache, batch: int, packed: bool, page_size: int, max_seqlen_q: int = None):
        """The cheap check of a call against its plan (shapes, dtypes, device): a ValueError naming what differs.
        q: (B, Sq, Hq, D) or packed (total_q, Hq, D); k_cache: the cache (or packed keys), (..., Hkv, D)."""
        got = dict(batch_size=batch, num_heads_q=q.shape[-2], num_heads_kv=k_cache.shape[-2], headdim=q.shape[-1],
                   dtype=q.dtype, device=q.device, packed=packed, page_size=page_size,
                   split_keys=batch_invariant.split_keys())
        if not packed:
            got["max_seqlen_q"] = q.shape[1]
        elif max_seqlen_q is not None:
            got["max_seqlen_q"] = max_seqlen_q
        bad = [f"{name} {value!r} (the plan's: {getattr(self, name)!r})" for name, value in got.items()
               if value != getattr(self, name) and not (name == "max_seqlen_q" and packed and value <= self.max_seqlen_q)]
        if bad:
            raise ValueError(f"{fn}: scheduler_metadata was made for another call: " + ", ".join(bad))


def replayable(meta, window_size) -> bool:
    """Whether a call may take its plan's replay (SchedulerMetadata.replays): it has a plan, a window as a tuple (a
    list is not a key), and runs eagerly (torch.compile traces the custom ops)."""
    return meta is not None and type(window_size) is tuple and not torch.compiler.is_compiling()


MAX_REPLAYS = 64  # distinct call layouts a plan remembers (a model's layers share one or a few)


def get_scheduler_metadata(batch_size, max_seqlen_q, max_seqlen_k, num_heads_q, num_heads_kv, headdim,
                           cache_seqlens, qkv_dtype=torch.bfloat16, headdim_v=None, cu_seqlens_q=None,
                           cu_seqlens_k_new=None, cache_leftpad=None, page_size=None, max_seqlen_k_new=0,
                           causal=False, window_size=(-1, -1), has_softcap=False, num_splits=0, pack_gqa=None,
                           sm_margin=0) -> SchedulerMetadata:
    """The plan of a step's split-KV calls, made once and passed as `scheduler_metadata=` to every layer's
    attention_with_kvcache / attention_varlen (over a KV cache) / flash_attn_with_kvcache / flash_attn_varlen_func
    call (FlashAttention-3's function and signature, as vLLM calls it once per step).

    Args:
        batch_size: sequences in the step. max_seqlen_q: queries per sequence (attention_with_kvcache: Sq; packed
            calls: the most of any sequence). max_seqlen_k: the most keys any sequence attends to (after the
            step's appends). num_heads_q, num_heads_kv, headdim (, headdim_v: default headdim): the layers' shapes.
        cache_seqlens: int32 (batch_size,) on the device the calls run on (its values are checked against
            max_seqlen_k here where it is on the CPU; on a GPU nothing is read, as in the calls).
        qkv_dtype: the queries' dtype (float16 / bfloat16 / float32; FP8 caches take 16 / 32-bit queries).
        cu_seqlens_q: int32 (batch_size + 1,): the plan is for packed calls (attention_varlen with block_table /
            seqused_k, flash_attn_varlen_func); None: for attention_with_kvcache / flash_attn_with_kvcache.
        page_size: the paged cache's page size (a multiple of 16), or None for contiguous caches.
        num_splits: as in the calls (0: chosen here, from the batch, heads, keys and SM count; 1: none).
        sm_margin: SMs the split plan leaves to other work (FlashAttention-3's).
        cu_seqlens_k_new, cache_leftpad, max_seqlen_k_new, causal, window_size, has_softcap: accepted for
            FlashAttention-3's signature; the plan does not depend on them (the calls take them per layer).
        pack_gqa: None: the split-KV kernels always give a kv group's query heads one program (where the group fits
            a tile); other values raise.

    A call given the plan checks only that its tensors match it (shapes, dtypes, device) and skips the value
    checks of its lengths and tables (done here). The plan may split differently from a call without one (its
    split count follows max_seqlen_k rather than the cache's capacity), and each sequence gets the same bits in
    every layer that uses it. Made in the batch-invariant mode, the plan holds the mode's splits (num_splits is
    ignored there), and the calls given it must run in the same mode and split size."""
    sizes = {n: _check_length(n, x) for n, x in (("batch_size", batch_size), ("max_seqlen_q", max_seqlen_q),
                                                 ("max_seqlen_k", max_seqlen_k), ("num_heads_q", num_heads_q),
                                                 ("num_heads_kv", num_heads_kv), ("headdim", headdim))}
    headdim_v = headdim if headdim_v is None else _check_length("headdim_v", headdim_v)
    sizes["headdim_v"] = headdim_v
    for name, n in sizes.items():
        if n < 1 and name != "max_seqlen_k":
            raise ValueError(f"{name} must be >= 1, got {n}")
    if num_heads_q % num_heads_kv:
        raise ValueError(f"num_heads_q ({num_heads_q}) must be a multiple of num_heads_kv ({num_heads_kv})")
    if qkv_dtype not in DTYPES:
        raise TypeError(f"qkv_dtype must be one of {', '.join(map(str, DTYPES))} (the queries' dtype; FP8 caches "
                        f"take 16 / 32-bit queries), got {qkv_dtype!r}")
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"cache_seqlens must be an int32 tensor, got {type(cache_seqlens).__name__}")
    device = cache_seqlens.device
    _check_int32_rows("cache_seqlens", cache_seqlens, batch_size, device)
    _check_num_splits(num_splits)
    _check_window(window_size)
    if pack_gqa is not None:
        raise ValueError(f"pack_gqa={pack_gqa!r}: the split-KV kernels choose it (a kv group's query heads share a "
                         f"program where the group fits a tile); pass None")
    if isinstance(sm_margin, bool) or not isinstance(sm_margin, numbers.Integral) or sm_margin < 0:
        raise ValueError(f"sm_margin must be an int >= 0, got {sm_margin!r}")
    page = 0 if page_size is None else _check_length("page_size", page_size)
    if page_size is not None and (page < 16 or page % 16):
        raise ValueError(f"page_size must be a multiple of 16, got {page_size}")
    if cu_seqlens_q is not None:
        _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, device)
        if cu_seqlens_q.shape[0] != batch_size + 1:
            raise ValueError(f"cu_seqlens_q must be ({batch_size + 1},), got {tuple(cu_seqlens_q.shape)}")
    if reads_values(cache_seqlens):
        longest = int(cache_seqlens.max())
        if longest > max_seqlen_k or int(cache_seqlens.min()) < 0:
            raise ValueError(f"cache_seqlens must lie in [0, max_seqlen_k = {max_seqlen_k}], got "
                             f"{cache_seqlens.tolist()}")
        if cu_seqlens_q is not None:
            check_cu_values("cu_seqlens_q", cu_seqlens_q, batch_size * max_seqlen_q, max_seqlen_q, "q")
    total_q = None if cu_seqlens_q is None else batch_size * max_seqlen_q  # a bound: the calls bring their own
    plan = decode_plan(num_heads_q, num_heads_kv, headdim, headdim_v, qkv_dtype, device, batch_size, max_seqlen_q,
                       max_seqlen_k, num_splits, total_q, sm_margin=int(sm_margin),
                       split_keys=batch_invariant.split_keys())
    return SchedulerMetadata(batch_size, max_seqlen_q, max_seqlen_k, num_heads_q, num_heads_kv, headdim, headdim_v,
                             qkv_dtype, device, cu_seqlens_q is not None, page, plan)


def check_metadata(meta, fn: str) -> Optional[SchedulerMetadata]:
    """scheduler_metadata as a call takes it: None or a SchedulerMetadata."""
    if meta is not None and not isinstance(meta, SchedulerMetadata):
        raise TypeError(f"{fn}: scheduler_metadata must come from fused_attn.get_scheduler_metadata, got "
                        f"{type(meta).__name__}")
    return meta

