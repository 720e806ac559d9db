"""Writing new keys and values into a paged KV cache (vLLM's reshape_and_cache_flash): one program per token,
every kv head at once, quantized to the cache's FP8 type on the way where the cache holds FP8."""
import torch
import triton
import triton.language as tl

from .common import _fp8_round
from .configs import head_block, next_power_of_2
from .launch import run


@triton.jit
def _write_rows(rows, t, page, slot, n_heads, fp8_max, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                BLOCK_D: tl.constexpr, QUANT: tl.constexpr, MANTISSA: tl.constexpr, MIN_EXP: tl.constexpr):
    """CACHE[page, slot, :, :] = X[t] (divided by SCALE per head and clamped into the FP8 range if QUANT), rows =
    (X's (token, head, col) strides, CACHE's (page, slot, head, col) strides, SCALE's (token, head) strides, X,
    CACHE, SCALE): numbers before the pointers (launch.SeqArgs says why)."""
    sx, sc, ss, X, CACHE, SCALE = rows
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_D)[None, :]
    ok = (heads < n_heads) & (cols < HEAD_DIM)
    x = tl.load(X + t * sx[0] + heads * sx[1] + cols * sx[2], mask=ok, other=0.0)
    if QUANT:
        x = x.to(tl.float32) / tl.load(SCALE + t * ss[0] + heads * ss[1], mask=heads < n_heads, other=1.0)
        x = _fp8_round(x, MANTISSA, MIN_EXP, fp8_max)
    tl.store(CACHE + page * sc[0] + slot * sc[1] + heads * sc[2] + cols * sc[3], x.to(CACHE.dtype.element_ty),
             mask=ok)


@triton.jit
def _write_kv_kernel(SLOTS, keys, values, page_size, n_heads, fp8_max, HEAD_DIM: tl.constexpr,
                     HEAD_DIM_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                     QUANT: tl.constexpr, MANTISSA: tl.constexpr, MIN_EXP: tl.constexpr):
    """Token t = program_id(0) to slot SLOTS[t] = page * page_size + offset; slot -1 (padding): nothing. keys /
    values: _write_rows's bundles."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + t).to(tl.int64)
    if slot >= 0:
        page = slot // page_size
        slot = slot % page_size
        _write_rows(keys, t, page, slot, n_heads, fp8_max, HEAD_DIM, BLOCK_H, BLOCK_D, QUANT, MANTISSA, MIN_EXP)
        _write_rows(values, t, page, slot, n_heads, fp8_max, HEAD_DIM_V, BLOCK_H, BLOCK_DV, QUANT, MANTISSA,
                    MIN_EXP)


# FP8 cache types: (stored mantissa bits, smallest normal exponent, largest finite value).
FP8 = {torch.float8_e4m3fn: (3, -6, 448.0), torch.float8_e5m2: (2, -14, 57344.0)}


def write_kv(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
    """Launch _write_kv_kernel: key (T, Hkv, D), value (T, Hkv, Dv) into caches (pages, page_size, Hkv, D / Dv) at
    slot_mapping (T,); FP8 caches (FP8's types) take k_scale / v_scale, float32 tensors of one value, one per kv
    head (Hkv,) or one per token and kv head (T, Hkv): the cache holds round(x / scale)."""
    run(write_launches(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale), "write_kv")


def write_launches(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
    """write_kv's launch as [(kernel, grid, args, kwargs)] (empty for no tokens): write_kv runs it, the compile-time
    gate compiles it."""
    T, H = key.shape[:2]
    if T == 0:
        return []
    mantissa, min_exp, fp8_max = FP8.get(k_cache.dtype, (0, 0, 0.0))
    scale_strides = (lambda s: (0, 0) if s is None or s.numel() == 1 else ((0,) + tuple(s.stride()))[-2:])
    return [(_write_kv_kernel, (T,),
             (slot_mapping, (tuple(key.stride()), tuple(k_cache.stride()), scale_strides(k_scale), key, k_cache,
                             k_scale),
              (tuple(value.stride()), tuple(v_cache.stride()), scale_strides(v_scale), value, v_cache, v_scale),
              k_cache.shape[1], H, fp8_max),
             dict(HEAD_DIM=key.shape[2], HEAD_DIM_V=value.shape[2], BLOCK_H=next_power_of_2(H),
                  BLOCK_D=head_block(key.shape[2]), BLOCK_DV=head_block(value.shape[2]), QUANT=k_cache.dtype in FP8,
                  MANTISSA=mantissa, MIN_EXP=min_exp))]
