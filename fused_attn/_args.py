"""Argument checking shared by the public functions and the reference: every invalid input gets a ValueError /
TypeError that names the bad value. The checks return bundles -- Args (q, k, v and the mask), Modifiers, Packed --
that the call path hands down to the ops as they are."""
import contextlib
import dataclasses
import math
import numbers
import re
from dataclasses import dataclass

import numpy
import torch
import triton

from .kernels import Modifiers, Packed, interpreter_active
from .mask import ALIGNMENTS, diagonal_offset, window_bounds

LAYOUTS = ("bhsd", "bshd")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)  # KV caches
MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class Args:
    q: torch.Tensor  # (B, Hq, Sq, D) views, whatever the layout
    k: torch.Tensor  # (B, Hkv, Sk, D)
    v: torch.Tensor  # (B, Hkv, Sk, Dv)
    scale: float
    left: int
    right: int
    offset: int
    layout: str


_value_checks = True  # off only inside without_value_checks()


def reads_values(t: torch.Tensor) -> bool:
    """Whether a check may read t's values on the host: only on the CPU (on a GPU that would synchronize it; there,
    as in FlashAttention, lengths and tables are trusted), outside torch.compile and without_value_checks()."""
    return _value_checks and t.device.type == "cpu" and not torch.compiler.is_compiling()


@contextlib.contextmanager
def without_value_checks():
    """Inside the block, CPU tensors skip the value checks as GPU tensors do (no value read on the host): for
    measuring the host path a GPU takes, and for counting host syncs on the CPU."""
    global _value_checks
    before, _value_checks = _value_checks, False
    try:
        yield
    finally:
        _value_checks = before


def _check_window(window_size):
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"window_size must be a pair (left, right) of ints, got {window_size!r}")
    for name, w in zip(("left", "right"), window_size):
        if isinstance(w, bool) or not isinstance(w, numbers.Integral):
            raise TypeError(f"window_size {name} must be an int, got {w!r} ({type(w).__name__})")
        if w < -1:
            raise ValueError(f"window_size {name} must be >= -1 (-1 = unbounded), got {w}")
    return int(window_size[0]), int(window_size[1])


def check_args(q, k, v, *, causal=False, window_size=(-1, -1), scale=None, layout="bhsd",
               alignment="bottom_right", dtypes=DTYPES, kv_fp8=False) -> Args:
    """q, k, v and the mask; kv_fp8: k and v are an FP8 cache (one FP8 dtype) for a q of `dtypes`."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if alignment not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")
    dims = "(B, H, S, D)" if layout == "bhsd" else "(B, S, H, D)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D {dims} for layout {layout!r}, got shape {tuple(t.shape)}")
        allowed = FP8_DTYPES if kv_fp8 and name != "q" else dtypes
        if t.dtype not in allowed:
            raise TypeError(f"{name} has unsupported dtype {t.dtype}; supported: {', '.join(map(str, allowed))}")
        if 0 in t.shape:
            raise ValueError(f"{name} has an empty dimension: shape {tuple(t.shape)}")
    if not (k.dtype == v.dtype and (kv_fp8 or q.dtype == k.dtype)):
        raise TypeError(f"q, k, v must share one dtype{' (k, v: one FP8 dtype)' if kv_fp8 else ''}, got {q.dtype}, "
                        f"{k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    left, right = _check_window(window_size)
    if causal and right > 0:
        raise ValueError(f"causal=True means window right = 0, but window_size={tuple(window_size)}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale must be a float or None, got {scale!r}")
        if not (math.isfinite(scale) and scale > 0):  # the kernels take the row max of the unscaled scores
            raise ValueError(f"scale must be a finite positive float, got {scale!r}")

    if layout == "bshd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    (B, Hq, Sq, D), (Bk, Hkv, Sk, Dk), (Bv, Hv, Sv, Dv) = q.shape, k.shape, v.shape
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} as (B, H, S, D)"
    if not (B == Bk == Bv):
        raise ValueError(f"batch sizes differ: {shapes}")
    if D != Dk:
        raise ValueError(f"q and k head dims differ ({D} vs {Dk}): {shapes}")
    if Hkv != Hv or Sk != Sv:
        raise ValueError(f"k and v must have the same heads and sequence length: {shapes}")
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv}): Hq % Hkv = {Hq % Hkv}")
    for name, d in (("q/k head dim D", D), ("v head dim Dv", Dv)):
        if d > MAX_HEAD_DIM:
            raise ValueError(f"{name} = {d} is larger than the supported maximum {MAX_HEAD_DIM}")
    left, right = window_bounds(causal, (left, right))
    return Args(q, k, v, 1.0 / math.sqrt(D) if scale is None else float(scale), left, right,
                diagonal_offset(Sq, Sk, alignment), layout)


def check_modifiers(batch, heads_q, device, *, softcap=0.0, alibi_slopes=None, dropout_p=0.0,
                    sinks=None) -> Modifiers:
    """softcap (finite, >= 0; 0 = off), alibi_slopes (None, or float32 (Hq,) / (B, Hq) on the tensors' device),
    dropout_p (in [0, 1)) and sinks (None, or float32 (Hq,) on the tensors' device), as a Modifiers."""
    for name, x in (("softcap", softcap), ("dropout_p", dropout_p)):
        if isinstance(x, bool) or not isinstance(x, numbers.Real):
            raise TypeError(f"{name} must be a float, got {x!r} ({type(x).__name__})")
    if not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"softcap must be a finite float >= 0 (0: no softcap), got {softcap!r}")
    if not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor):
            raise TypeError(f"alibi_slopes must be a torch.Tensor or None, got {type(alibi_slopes).__name__}")
        if alibi_slopes.dtype != torch.float32:
            raise TypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
        if tuple(alibi_slopes.shape) not in ((heads_q,), (batch, heads_q)):
            raise ValueError(f"alibi_slopes must be (Hq,) = ({heads_q},) or (B, Hq) = ({batch}, {heads_q}), got "
                             f"shape {tuple(alibi_slopes.shape)}")
        if alibi_slopes.device != device:
            raise ValueError(f"alibi_slopes is on {alibi_slopes.device}, the tensors on {device}")
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor):
            raise TypeError(f"sinks must be a torch.Tensor or None, got {type(sinks).__name__}")
        if sinks.dtype != torch.float32:
            raise TypeError(f"sinks must be float32 (one logit per query head), got {sinks.dtype}")
        if tuple(sinks.shape) != (heads_q,):
            raise ValueError(f"sinks must be (Hq,) = ({heads_q},), got shape {tuple(sinks.shape)}")
        if sinks.device != device:
            raise ValueError(f"sinks is on {sinks.device}, the tensors on {device}")
    return Modifiers(float(softcap), alibi_slopes, float(dropout_p), sinks=sinks)


def _check_length(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def _check_cu_seqlens(name, cu, device):
    """What cu_seqlens is, checked without reading its values: an int32 (B + 1,) tensor on the tensors' device."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 2:
        raise ValueError(f"{name} must be 1-D (batch + 1,) with at least 2 entries, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device}, the tensors on {device}")


def check_cu_values(name, cu, total, max_seqlen, tensor_name):
    """The values of cu_seqlens: start 0, non-decreasing, end <= total rows, every length <= max_seqlen."""
    c = cu.tolist()
    if c[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {c[0]}")
    lengths = [b - a for a, b in zip(c, c[1:])]
    for i, n in enumerate(lengths):
        if n < 0:
            raise ValueError(f"{name} must be non-decreasing: {name}[{i + 1}] = {c[i + 1]} < {name}[{i}] = {c[i]}")
    if c[-1] > total:
        raise ValueError(f"{name}[-1] = {c[-1]} is beyond the {total} rows of {tensor_name}")
    if max_seqlen is not None and max(lengths) > max_seqlen:
        i = lengths.index(max(lengths))
        raise ValueError(f"sequence {i} has {lengths[i]} rows by {name}, more than max_seqlen {max_seqlen} "
                         f"(the grid covers max_seqlen rows per sequence)")
    return lengths


def check_varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False,
                      window_size=(-1, -1), scale=None, dtypes=DTYPES, values=None, kv_fp8=False):
    """check_args for packed sequences: q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv), cu_seqlens
    int32 (B + 1,). The cu_seqlens values are read (check_cu_values) when values is True, or when None and they
    are on the CPU (reading them from a GPU would synchronize it) outside torch.compile (which cannot trace a
    check of data). max_seqlen None: no bound to check (the reference's convention; the kernels need both).
    Returns (Args of (1, H, total, D) views, Packed)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if isinstance(t, torch.Tensor) and t.dim() != 3:
            raise ValueError(f"{name} must be 3-D (total, H, D) for packed sequences, got shape {tuple(t.shape)}")
    a = check_args(*(t.unsqueeze(0) if isinstance(t, torch.Tensor) else t for t in (q, k, v)), causal=causal,
                   window_size=window_size, scale=scale, layout="bshd", dtypes=dtypes, kv_fp8=kv_fp8)
    lengths = [m if m is None else _check_length(name, m)
               for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k))]
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        _check_cu_seqlens(name, cu, q.device)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), got "
                         f"{cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}")
    if values or (values is None and reads_values(cu_seqlens_q)):
        check_cu_values("cu_seqlens_q", cu_seqlens_q, q.shape[0], lengths[0], "q")
        check_cu_values("cu_seqlens_k", cu_seqlens_k, k.shape[0], lengths[1], "k")
    return a, Packed(cu_seqlens_q, cu_seqlens_k, *lengths)

def _check_int32_rows(name, t, rows, device):
    """An int32 (rows,) tensor on `device` (cache_seqlens, seqused_k, cache_batch_idx, ...)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32 or tuple(t.shape) != (rows,):
        raise ValueError(f"{name} must be int32 of shape ({rows},), got {t.dtype} {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, the tensors on {device}")


def _check_block_table(block_table, batch, device):
    if not isinstance(block_table, torch.Tensor):
        raise TypeError(f"block_table must be a torch.Tensor, got {type(block_table).__name__}")
    if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != batch:
        raise ValueError(f"block_table must be int32 (B={batch}, max_pages), got {block_table.dtype} "
                         f"{tuple(block_table.shape)}")
    if block_table.device != device:
        raise ValueError(f"block_table is on {block_table.device}, the tensors on {device}")


def _check_page_size(page):
    if page % 16:
        raise ValueError(f"the page size (k_cache.shape[1]) must be a multiple of 16, got {page}")


def _check_inference(fn, **tensors):
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{fn} is inference only: {name} requires grad (use torch.no_grad() or .detach())")


def _check_num_splits(num_splits):
    if isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0: chosen automatically), got {num_splits!r}")


def check_serving_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, block_table,
                         num_splits, *, causal=False, window_size=(-1, -1), scale=None, values=True):
    """attention_varlen over a KV cache (forward only): packed q (total_q, Hq, D); k, v paged (num_pages,
    page_size, Hkv, D) with block_table (B, max_pages) int32, cu_seqlens_k None and seqused_k (B,) int32 -- or
    packed (total_k, Hkv, D) with cu_seqlens_k, seqused_k optional; either in q's dtype or FP8. The values
    (cu_seqlens_q, seqused_k within each sequence's capacity and max_seqlen_k, pages that exist) are read only on
    the CPU outside torch.compile.
    With block_table, FlashAttention-2's call passes the key counts as cu_seqlens_k instead of seqused_k.
    values=False: no value is read (a step's plan checked them).
    Returns (Args of (1, H, total, D) views -- one page of k, v when paged --, Packed, page size or 0, seqused_k)."""
    _check_num_splits(num_splits)
    fp8 = isinstance(k, torch.Tensor) and k.dtype in FP8_DTYPES
    if block_table is None:
        a, packed = check_varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                      causal=causal, window_size=window_size, scale=scale, values=False,
                                      kv_fp8=fp8)
        page = 0
    else:
        if cu_seqlens_k is not None and seqused_k is not None:
            raise ValueError("with block_table the keys are paged: give each sequence's key count once, in seqused_k "
                             "(FlashAttention-3 / vLLM) or as cu_seqlens_k's differences (FlashAttention-2), not both")
        if cu_seqlens_k is None and seqused_k is None:
            raise ValueError("block_table needs seqused_k (B,) int32 (or cu_seqlens_k (B + 1,) int32, "
                             "FlashAttention-2's): each sequence's number of cached keys")
        if isinstance(q, torch.Tensor) and q.dim() != 3:
            raise ValueError(f"q must be 3-D (total_q, Hq, D) for packed sequences, got shape {tuple(q.shape)}")
        for name, t in (("k", k), ("v", v)):
            if isinstance(t, torch.Tensor) and t.dim() != 4:
                raise ValueError(f"{name} must be a paged cache (num_pages, page_size, Hkv, D) with block_table, "
                                 f"got shape {tuple(t.shape)}")
        a = check_args(q.unsqueeze(0), k[:1], v[:1], causal=causal, window_size=window_size, scale=scale,
                       layout="bshd", kv_fp8=fp8)
        if k.shape[:3] != v.shape[:3]:
            raise ValueError(f"k and v caches must agree but for the head dim: {tuple(k.shape)} vs {tuple(v.shape)}")
        page = k.shape[1]
        _check_page_size(page)
        _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device)
        _check_block_table(block_table, cu_seqlens_q.shape[0] - 1, q.device)
        if cu_seqlens_k is not None:  # FlashAttention-2's paged call: the key counts as running sums
            _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device)
            if cu_seqlens_k.shape != cu_seqlens_q.shape:
                raise ValueError(f"cu_seqlens_k must have the shape of cu_seqlens_q {tuple(cu_seqlens_q.shape)}, got "
                                 f"{tuple(cu_seqlens_k.shape)}")
            seqused_k = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
        packed = Packed(cu_seqlens_q, None, *(_check_length(n, m) for n, m in (("max_seqlen_q", max_seqlen_q),
                                                                              ("max_seqlen_k", max_seqlen_k))))
    batch = cu_seqlens_q.shape[0] - 1
    if seqused_k is not None:
        _check_int32_rows("seqused_k", seqused_k, batch, q.device)
    if values and reads_values(cu_seqlens_q):
        check_cu_values("cu_seqlens_q", cu_seqlens_q, q.shape[0], packed.max_seqlen_q, "q")
        if block_table is None:
            lengths = check_cu_values("cu_seqlens_k", cu_seqlens_k, k.shape[0], None, "k")
        else:
            lengths = [block_table.shape[1] * page] * batch
        used = lengths if seqused_k is None else seqused_k.tolist()
        for b, (n, cap) in enumerate(zip(used, lengths)):
            if not 0 <= n <= min(cap, packed.max_seqlen_k):
                raise ValueError(f"sequence {b}: seqused_k {n} must lie in [0, {min(cap, packed.max_seqlen_k)}] "
                                 f"(its {'cache holds' if page else 'cu_seqlens_k gives'} {cap} keys, max_seqlen_k "
                                 f"{packed.max_seqlen_k})")
            pages = block_table[b, :-(-n // page)].tolist() if page and n else []
            bad = [p for p in pages if not 0 <= p < k.shape[0]]
            if bad:
                raise ValueError(f"sequence {b}: block_table names page {bad[0]}, but the cache has pages "
                                 f"0..{k.shape[0] - 1}")
    return a, packed, page, seqused_k


def check_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, block_table, num_splits, inference_only=True,
                  cache_batch_idx=None, cache_leftpad=None):
    """Shapes, dtypes and devices of attention_with_kvcache's arguments (beyond check_args'); returns
    (cache_seqlens as int32 (B,), capacity of a row in keys, page size or 0). cache_batch_idx / cache_leftpad:
    int32 (B,) on q's device, contiguous caches only; with cache_batch_idx the cache may hold any number of rows."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D, got shape {tuple(t.shape)}")
    if inference_only:
        _check_inference("attention_with_kvcache", q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v)
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (new keys and values to append) or both be None")
    B = q.shape[0]
    _check_num_splits(num_splits)
    for name, t in (("cache_batch_idx", cache_batch_idx), ("cache_leftpad", cache_leftpad)):
        if t is None:
            continue
        _check_int32_rows(name, t, B, q.device)
        if block_table is not None:
            raise ValueError(f"{name} takes a contiguous cache, not a paged one (block_table), as in FlashAttention")
    if block_table is None and cache_batch_idx is not None:
        if k_cache.shape[0] != v_cache.shape[0]:
            raise ValueError(f"k_cache / v_cache must have as many rows, got {tuple(k_cache.shape)} and "
                             f"{tuple(v_cache.shape)}")
        capacity, page = k_cache.shape[1], 0
    elif block_table is None:
        if k_cache.shape[0] != B or v_cache.shape[0] != B:
            raise ValueError(f"k_cache / v_cache must be (B, S_cache, Hkv, D) with B = {B} (q's batch), got "
                             f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
        capacity, page = k_cache.shape[1], 0
    else:
        _check_block_table(block_table, B, q.device)
        page = k_cache.shape[1]
        _check_page_size(page)
        capacity = block_table.shape[1] * page
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(f"k_cache and v_cache must agree but for the head dim: {tuple(k_cache.shape)} vs "
                         f"{tuple(v_cache.shape)}")
    if k is not None:
        want_k = (B, k.shape[1] if k.dim() == 4 else -1, k_cache.shape[2], k_cache.shape[3])
        for name, t, want in (("k", k, want_k), ("v", v, want_k[:3] + (v_cache.shape[3],))):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4 or tuple(t.shape) != want:
                raise ValueError(f"{name} must be (B, S_new, Hkv, D) = {want} to match q and the cache, got "
                                 f"{tuple(t.shape)}")
            want = q.dtype if k_cache.dtype in FP8_DTYPES else k_cache.dtype  # written quantized to an FP8 cache
            if t.dtype != want or t.device != k_cache.device:
                raise TypeError(f"{name} must have dtype {want} and the cache's device {k_cache.device}, got "
                                f"{t.dtype}, {t.device}")
    if cache_seqlens is None:
        cache_seqlens = capacity - (0 if k is None else k.shape[1])
    if isinstance(cache_seqlens, numbers.Integral) and not isinstance(cache_seqlens, bool):
        cache_seqlens = torch.full((B,), int(cache_seqlens), dtype=torch.int32, device=q.device)
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"cache_seqlens must be an int or an int32 (B,) tensor, got {type(cache_seqlens).__name__}")
    _check_int32_rows("cache_seqlens", cache_seqlens, B, q.device)
    return cache_seqlens, capacity, page


def check_descales(descales: dict, dtype, batch, heads_kv, device, holder="caches"):
    """FP8 dequantization factors (FlashAttention-3's): float32 (B, Hkv), or one value, each of `descales`
    ({name: tensor or None}) given exactly when the tensors (`holder`) hold FP8 (`dtype`). Returns them as contiguous
    (B, Hkv) tensors in order, or Nones."""
    cc = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    if dtype == torch.float8_e4m3fn and cc is not None and cc < (8, 9):
        raise ValueError(f"float8_e4m3fn {holder} need a GPU of compute capability 8.9 or newer (Triton has no e4m3 "
                         f"before), this one is {cc}; use float8_e5m2")
    if dtype not in FP8_DTYPES:
        for name, d in descales.items():
            if d is not None:
                raise ValueError(f"{name} is for FP8 {holder}; these hold {dtype}")
        return tuple(None for _ in descales)
    out = []
    for name, d in descales.items():
        if d is None:
            raise ValueError(f"FP8 {holder} ({dtype}) need {name}: float32 (B, Hkv) = ({batch}, {heads_kv}) or one "
                             f"value")
        if not isinstance(d, torch.Tensor):
            raise TypeError(f"{name} must be a float32 tensor, got {type(d).__name__}")
        if d.dtype != torch.float32 or (d.numel() != 1 and tuple(d.shape) != (batch, heads_kv)):
            raise ValueError(f"{name} must be float32 (B, Hkv) = ({batch}, {heads_kv}) or one value, got {d.dtype} "
                             f"{tuple(d.shape)}")
        if d.device != device:
            raise ValueError(f"{name} is on {d.device}, the tensors on {device}")
        out.append(d.reshape(-1, 1).expand(batch, heads_kv).contiguous() if d.numel() == 1 else d.contiguous())
    return tuple(out)


OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_fp8(a: Args, mods: Modifiers, batch: int, descales: dict, out_dtype, attn_mask=None):
    """FP8 q, k, v (FlashAttention-3's FP8 forward): their descales (check_descales), forward only (no input
    requires grad), no dropout, no attn_mask; out_dtype bfloat16 (default), float16 or float32. For other inputs
    the descales and out_dtype must be absent. Returns (Modifiers with the descales, out_dtype or None)."""
    dtype = a.q.dtype
    qd, kd, vd = check_descales(descales, dtype, batch, a.k.shape[1], a.q.device, "q, k, v")
    if dtype not in FP8_DTYPES:
        if out_dtype is not None:
            raise ValueError(f"out_dtype is for FP8 inputs; these are {dtype} (the output takes their dtype)")
        return mods, None
    _check_inference("attention with FP8 inputs", q=a.q, k=a.k, v=a.v)
    if mods.dropout_p:
        raise ValueError(f"dropout_p ({mods.dropout_p}) is for training; FP8 attention is forward only")
    if attn_mask is not None:
        raise ValueError("attn_mask is not implemented with FP8 inputs (causal / window_size are)")
    out_dtype = torch.bfloat16 if out_dtype is None else out_dtype
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {', '.join(map(str, OUT_DTYPES))}, got {out_dtype!r}")
    return dataclasses.replace(mods, q_descale=qd, k_descale=kd, v_descale=vd), out_dtype


def check_cache_scale(name, scale, heads, device):
    """An FP8 cache's scale: a float32 tensor of one value or one per kv head (Hkv,)."""
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"{name} must be a float32 tensor for an FP8 cache, got {type(scale).__name__}")
    if scale.dtype != torch.float32 or scale.numel() not in (1, heads) or scale.dim() > 1:
        raise ValueError(f"{name} must be float32 of one value or ({heads},) (one per kv head), got {scale.dtype} "
                         f"{tuple(scale.shape)}")
    if scale.device != device:
        raise ValueError(f"{name} is on {scale.device}, the caches on {device}")


def check_write_kv(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale):
    """write_kv_cache's arguments: key (T, Hkv, D), value (T, Hkv, Dv) into caches (num_pages, page_size, Hkv, D /
    Dv) of their dtype, or FP8 with k_scale / v_scale; slot_mapping int64 or int32 (T,), its values (CPU only) in
    [-1, num_pages * page_size)."""
    for name, t in (("key", key), ("value", value), ("k_cache", k_cache), ("v_cache", v_cache),
                    ("slot_mapping", slot_mapping)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != key.device:
            raise ValueError(f"{name} is on {t.device}, key on {key.device}")
    for name, t, rank in (("key", key, 3), ("value", value, 3), ("k_cache", k_cache, 4), ("v_cache", v_cache, 4)):
        if t.dim() != rank:
            dims = "(T, Hkv, D)" if rank == 3 else "(num_pages, page_size, Hkv, D)"
            raise ValueError(f"{name} must be {rank}-D {dims}, got shape {tuple(t.shape)}")
    if key.shape[:2] != value.shape[:2] or k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(f"key {tuple(key.shape)} / value {tuple(value.shape)} and k_cache {tuple(k_cache.shape)} / "
                         f"v_cache {tuple(v_cache.shape)} must agree but for the head dims")
    if (key.shape[1], key.shape[2], value.shape[2]) != (k_cache.shape[2], k_cache.shape[3], v_cache.shape[3]):
        raise ValueError(f"key / value (T, Hkv, D) = {tuple(key.shape)} / {tuple(value.shape)} do not match the "
                         f"caches' (Hkv, D) {tuple(k_cache.shape[2:])} / {tuple(v_cache.shape[2:])}")
    if key.dtype not in DTYPES or value.dtype != key.dtype:
        raise TypeError(f"key and value must have one dtype of {', '.join(map(str, DTYPES))}, got {key.dtype} and "
                        f"{value.dtype}")
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in (key.dtype,) + FP8_DTYPES:
        raise TypeError(f"the caches must have key's dtype {key.dtype} or an FP8 one, got {k_cache.dtype} and "
                        f"{v_cache.dtype}")
    fp8 = k_cache.dtype in FP8_DTYPES
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if fp8:
            check_cache_scale(name, s, key.shape[1], key.device)
        elif s is not None:
            raise ValueError(f"{name} is for FP8 caches; these hold {k_cache.dtype}")
    if slot_mapping.dtype not in (torch.int64, torch.int32) or tuple(slot_mapping.shape) != (key.shape[0],):
        raise ValueError(f"slot_mapping must be int64 (or int32) of shape ({key.shape[0]},), got "
                         f"{slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    if reads_values(slot_mapping) and slot_mapping.numel():
        n = k_cache.shape[0] * k_cache.shape[1]
        lo, hi = int(slot_mapping.min()), int(slot_mapping.max())
        if lo < -1 or hi >= n:
            raise ValueError(f"slot_mapping holds {lo if lo < -1 else hi}, outside [-1, {n}) (-1: padding; the "
                             f"caches hold {k_cache.shape[0]} pages of {k_cache.shape[1]} slots)")
    check_device(key.device)


def check_mod_args(mod_args, device, whose: str) -> tuple:
    """The extra arguments of a @triton.jit mask or score function (`whose` names it): tensors on `device`
    (pointers in the function), ints, floats."""
    args = tuple(mod_args)
    for x in args:
        if not isinstance(x, (torch.Tensor, int, float)) or isinstance(x, bool):
            raise TypeError(f"mod_args must be tensors, ints or floats, got {type(x).__name__} (an argument of "
                            f"{whose})")
        if isinstance(x, torch.Tensor) and x.device != device:
            raise ValueError(f"mod_args tensors must be on {device}, got one on {x.device} (an argument of {whose})")
    return args


def check_rotary(q, k, rotary_cos, rotary_sin):
    """rotary_cos / rotary_sin: both or neither; (seqlen_ro, rotary_dim / 2) in q's dtype and device, rotary_dim even
    and <= the head dim; they rotate the new keys, so k must be given."""
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if rotary_cos is None:
        return
    if k is None:
        raise ValueError("rotary_cos / rotary_sin rotate the new keys and the queries: pass k and v (as in "
                         "FlashAttention)")
    for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2 or t.shape != rotary_cos.shape or 2 * t.shape[1] > q.shape[-1]:
            raise ValueError(f"{name} must be (seqlen_ro, rotary_dim / 2) with rotary_dim <= the head dim "
                             f"{q.shape[-1]}, both alike; got {tuple(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise TypeError(f"{name} must have q's dtype and device ({q.dtype}, {q.device}), got {t.dtype}, "
                            f"{t.device}")


def check_kvcache_values(cache_seqlens, s_new, capacity, block_table, page, n_pages, cache_batch_idx=None,
                         cache_leftpad=None, n_rows=None):
    """What can only be read from the values: lengths within the cache, pages and cache rows that exist, left
    padding within each row's length (CPU tensors only)."""
    lengths = cache_seqlens.tolist()
    for b, n in enumerate(lengths):
        if n < 0 or n + s_new > capacity:
            raise ValueError(f"row {b}: cache_seqlens {n} + {s_new} new keys must lie in [0, {capacity}] (the cache "
                             f"holds {capacity} keys per row)")
        if cache_batch_idx is not None and not 0 <= int(cache_batch_idx[b]) < n_rows:
            raise ValueError(f"row {b}: cache_batch_idx {int(cache_batch_idx[b])} names no cache row (0..{n_rows - 1})")
        if cache_leftpad is not None and not 0 <= int(cache_leftpad[b]) <= n:
            raise ValueError(f"row {b}: cache_leftpad {int(cache_leftpad[b])} must lie in [0, cache_seqlens {n}]")
        if block_table is not None:
            used = block_table[b, :-(-(n + s_new) // page)].tolist() if n + s_new else []
            bad = [p for p in used if not 0 <= p < n_pages]
            if bad:
                raise ValueError(f"row {b}: block_table names page {bad[0]}, but the cache has pages 0..{n_pages - 1}")


def _version(text: str) -> tuple:
    return tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", text).groups())


_runs = {}  # (triton version, numpy version) -> whether the interpreter runs the kernels


def _interpreter_runs(triton_version: str, numpy_version: str) -> bool:
    """Whether this Triton's interpreter runs the kernels with this NumPy (parsed once per pair of versions; a
    dict, not functools.lru_cache, which torch.compile warns about)."""
    key = (triton_version, numpy_version)
    if key not in _runs:
        _runs[key] = not (_version(triton_version) < (3, 7) and _version(numpy_version) >= (2, 4))
    return _runs[key]


def _check_interpreter():
    """Triton < 3.7's interpreter turns 1-element arrays into loop bounds with int(), which NumPy >= 2.4 refuses
    ("only 0-dimensional arrays can be converted to Python scalars") in every kernel with a runtime-bounded loop."""
    if not _interpreter_runs(triton.__version__, numpy.__version__):
        raise RuntimeError(f"the Triton {triton.__version__} interpreter cannot run these kernels with NumPy "
                           f"{numpy.__version__}: install 'numpy<2.4' or 'triton>=3.7' to run them on the CPU")


def check_device(device: torch.device):
    """The kernels run on CUDA, or on the CPU through the Triton interpreter."""
    if device.type == "cuda":
        return
    if device.type == "cpu":
        if interpreter_active():
            _check_interpreter()
            return
        raise ValueError(
            "fused_attn runs its Triton kernels on CUDA tensors; got CPU tensors. To run the same kernels on the "
            "CPU, set TRITON_INTERPRET=1 in the environment before importing fused_attn (slow; for testing), "
            "or use fused_attn.reference.attention for a plain PyTorch computation.")
    raise ValueError(f"fused_attn supports CUDA tensors (or CPU under TRITON_INTERPRET=1), got device {device}")


MAX_OFFSET = 2**31 - 1  # the kernels address within one (batch, head) slice with 32-bit offsets


def extent(t: torch.Tensor, rows: int) -> int:
    """The largest element offset of rows [0, rows) of a (B, H, S, D)-indexed view within one (batch, head) slice."""
    return (rows - 1) * t.stride(2) + (t.shape[3] - 1) * t.stride(3)


def check_offsets(extents):
    """Within a (batch, head) slice -- a sequence, when packed; a row of a cache -- the kernels use int32 offsets:
    refuse slices that would overflow them. extents: (name, largest offset) pairs."""
    for name, n in extents:
        if n > MAX_OFFSET:
            raise ValueError(f"{name} spans {n} elements within one (batch, head) slice, more than the "
                             f"{MAX_OFFSET} the kernels address with 32-bit offsets; split the sequence")


def check_kernel_inputs(a: Args, packed: Packed = None):
    """What the kernels themselves need of checked Args: packed, both max lengths (they size the grid); 32-bit
    offsets within a slice (a.k, a.v: S rows, or, for a paged cache, a page of them); a device they run on."""
    Sq, Sk = a.q.shape[2], a.k.shape[2]
    if packed is not None:
        for name in ("max_seqlen_q", "max_seqlen_k"):
            if getattr(packed, name) is None:
                raise TypeError(f"{name} must be an int (the longest sequence; the kernels' grid covers it), got None")
        Sq, Sk = packed.max_seqlen_q, packed.max_seqlen_k
    Hq, Dv = a.q.shape[1], a.v.shape[3]
    out_extent = (Sq - 1) * (Hq * Dv if a.layout == "bshd" else Dv) + Dv - 1  # out is allocated in the layout
    check_offsets([("q", extent(a.q, Sq)), ("k", extent(a.k, Sk)), ("v", extent(a.v, Sk)), ("out", out_extent)])
    check_device(a.q.device)


def refuse_fp8(q):
    """A TypeError for FP8 q where the call has no descales to give: FP8 values without them are not the numbers
    they stand for (and the output would be FP8 too). attention / attention_varlen take them."""
    if isinstance(q, torch.Tensor) and q.dtype in FP8_DTYPES:
        raise TypeError(f"q has dtype {q.dtype}: FP8 inputs need their descales, which this call takes no argument "
                        f"for; use fused_attn.attention(q, k, v, q_descale=..., k_descale=..., v_descale=...) "
                        f"(fused_attn.quantize_fp8 makes them), or float16 / bfloat16 / float32 inputs")


def input_dtypes(q, dtypes=DTYPES) -> tuple:
    """The dtypes q, k, v may take: FP8's where q is FP8 (FP8 attention; check_fp8 checks what comes with them),
    else `dtypes`."""
    return FP8_DTYPES if isinstance(q, torch.Tensor) and q.dtype in FP8_DTYPES else dtypes


def kernel_args(q, k, v, *, causal=False, window_size=(-1, -1), scale=None, layout="bhsd", fp8=False):
    """check_args plus check_kernel_inputs. fp8: FP8 q, k, v allowed (input_dtypes) -- for the calls that take
    their descales (check_fp8); elsewhere they raise (refuse_fp8)."""
    if not fp8:
        refuse_fp8(q)
    a = check_args(q, k, v, causal=causal, window_size=window_size, scale=scale, layout=layout,
                   dtypes=input_dtypes(q) if fp8 else DTYPES)
    check_kernel_inputs(a)
    return a


def check_attn_mask(attn_mask, shape, device):
    """attn_mask: a tensor broadcastable to shape = (B, Hq, Sq, Sk) on the tensors' device, bool (True: the pair
    takes part, SDPA's convention) or float16 / bfloat16 / float32 (an additive bias; -inf: the pair takes no
    part)."""
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype not in (torch.bool, torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"attn_mask must be bool (True: the pair takes part) or a float16 / bfloat16 / float32 bias, "
                        f"got {attn_mask.dtype}")
    try:
        if attn_mask.dim() > 4 or torch.broadcast_shapes(attn_mask.shape, shape) != torch.Size(shape):
            raise RuntimeError
    except RuntimeError:
        raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (B, Hq, Sq, Sk) = "
                         f"{tuple(shape)}") from None
    if attn_mask.device != device:
        raise ValueError(f"attn_mask is on {attn_mask.device}, the tensors on {device}")

