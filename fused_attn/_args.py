"""Argument checking shared by fused_attn.attention and the reference: every invalid input gets a
ValueError / TypeError that names the bad value."""
import math
import numbers
from dataclasses import dataclass

import torch

from .mask import ALIGNMENTS, diagonal_offset, window_bounds

LAYOUTS = ("bhsd", "bshd")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


@dataclass
class Args:
    q: torch.Tensor  # (B, Hq, Sq, D) views, whatever the layout
    k: torch.Tensor  # (B, Hkv, Sk, D)
    v: torch.Tensor  # (B, Hkv, Sk, Dv)
    scale: float
    left: int
    right: int
    offset: int
    layout: str


def _check_window(window_size):
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"window_size must be a pair (left, right) of ints, got {window_size!r}")
    for name, w in zip(("left", "right"), window_size):
        if isinstance(w, bool) or not isinstance(w, numbers.Integral):
            raise TypeError(f"window_size {name} must be an int, got {w!r} ({type(w).__name__})")
        if w < -1:
            raise ValueError(f"window_size {name} must be >= -1 (-1 = unbounded), got {w}")
    return int(window_size[0]), int(window_size[1])


def check_args(q, k, v, causal=False, window_size=(-1, -1), scale=None, layout="bhsd",
               alignment="bottom_right", dtypes=DTYPES) -> Args:
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
        if t.dtype not in dtypes:
            raise TypeError(f"{name} has unsupported dtype {t.dtype}; supported: {', '.join(map(str, dtypes))}")
        if 0 in t.shape:
            raise ValueError(f"{name} has an empty dimension: shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
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
