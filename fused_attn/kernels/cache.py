"""Writing new keys and values into a paged KV cache (vLLM's reshape_and_cache_flash): one program per token,
every kv head at once, quantized to the cache's FP8 type on the way where the cache holds FP8."""
import torch
import triton
import triton.language as tl

from .common import _fp8_round
from .configs import head_block, next_power_of_2
from .launch import run


@triton.jit
def _write_rows(X, CACHE, SCALE, t, page, slot, stride_xt, stride_xh, stride_xd, stride_cp, stride_cs, stride_ch,
                stride_cd, stride_st, stride_sh, n_heads, fp8_max, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                BLOCK_D: tl.constexpr, QUANT: tl.constexpr, MANTISSA: tl.constexpr, MIN_EXP: tl.constexpr):
    """CACHE[page, slot, :, :] = X[t] (divided by SCALE per head and clamped into the FP8 range if QUANT)."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_D)[None, :]
    ok = (heads < n_heads) & (cols < HEAD_DIM)
    x = tl.load(X + t * stride_xt + heads * stride_xh + cols * stride_xd, mask=ok, other=0.0)
    if QUANT:
        x = x.to(tl.float32) / tl.load(SCALE + t * stride_st + heads * stride_sh, mask=heads < n_heads, other=1.0)
        x = _fp8_round(x, MANTISSA, MIN_EXP, fp8_max)
    tl.store(CACHE + page * stride_cp + slot * stride_cs + heads * stride_ch + cols * stride_cd,
             x.to(CACHE.dtype.element_ty), mask=ok)


@triton.jit
def _write_kv_kernel(KEY, VALUE, K_CACHE, V_CACHE, SLOTS, K_SCALE, V_SCALE, page_size, n_heads, fp8_max,
                     stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
                     stride_kp, stride_ks, stride_kch, stride_kcd, stride_vp, stride_vs, stride_vch, stride_vcd,
                     stride_kst, stride_ksh, stride_vst, stride_vsh,
                     HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, QUANT: tl.constexpr, MANTISSA: tl.constexpr,
                     MIN_EXP: tl.constexpr):
    """Token t = program_id(0) to slot SLOTS[t] = page * page_size + offset; slot -1 (padding): nothing."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + t).to(tl.int64)
    if slot < 0:
        return
    page = slot // page_size
    slot = slot % page_size
    _write_rows(KEY, K_CACHE, K_SCALE, t, page, slot, stride_kt, stride_kh, stride_kd, stride_kp, stride_ks,
                stride_kch, stride_kcd, stride_kst, stride_ksh, n_heads, fp8_max, HEAD_DIM, BLOCK_H, BLOCK_D, QUANT,
                MANTISSA, MIN_EXP)
    _write_rows(VALUE, V_CACHE, V_SCALE, t, page, slot, stride_vt, stride_vh, stride_vd, stride_vp, stride_vs,
                stride_vch, stride_vcd, stride_vst, stride_vsh, n_heads, fp8_max, HEAD_DIM_V, BLOCK_H, BLOCK_DV, QUANT,
                MANTISSA, MIN_EXP)


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
    scale_strides = (lambda s: (0, 0) if s is None or s.numel() == 1 else ((0,) + s.stride())[-2:])
    return [(_write_kv_kernel, (T,),
             (key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale, k_cache.shape[1], H, fp8_max,
              *key.stride(), *value.stride(), *k_cache.stride(), *v_cache.stride(), *scale_strides(k_scale),
              *scale_strides(v_scale)),
             dict(HEAD_DIM=key.shape[2], HEAD_DIM_V=value.shape[2], BLOCK_H=next_power_of_2(H),
                  BLOCK_D=head_block(key.shape[2]), BLOCK_DV=head_block(value.shape[2]), QUANT=k_cache.dtype in FP8,
                  MANTISSA=mantissa, MIN_EXP=min_exp))]
