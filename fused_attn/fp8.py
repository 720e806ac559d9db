"""quantize_fp8: tensors and their descales for FP8 attention (FlashAttention-3's per-(batch, kv head) scaling)."""
import torch

from ._args import FP8_DTYPES


def quantize_fp8(x: torch.Tensor, dim: int = 1, heads: int = None, dtype: torch.dtype = torch.float8_e4m3fn):
    """(x_fp8, descale) with x ~= x_fp8 * descale per (batch, head group): x (B, ...) with its heads along `dim`
    (1 for (B, H, S, D), 2 for (B, S, H, D)); `heads` descale groups of consecutive heads (default: one per head;
    pass Hkv for queries, whose descale FP8 attention takes per kv head). descale = amax / the type's largest
    finite value (1 where a group is all zeros), float32 (B, heads); x / descale rounded to nearest in `dtype`."""
    if dtype not in FP8_DTYPES:
        raise TypeError(f"dtype must be one of {', '.join(map(str, FP8_DTYPES))}, got {dtype}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise TypeError(f"x must be a floating-point tensor of 2 or more dims, got {getattr(x, 'shape', type(x))}")
    dim = dim % x.dim()
    if dim == 0:
        raise ValueError("dim is the heads' dimension; dimension 0 is the batch")
    H = x.shape[dim]
    heads = H if heads is None else heads
    if heads <= 0 or H % heads:
        raise ValueError(f"heads ({heads}) must divide the {H} heads along dim {dim}")
    # (B, heads, H / heads, rest...): the amax over everything but batch and head group
    grouped = x.movedim(dim, 1).reshape(x.shape[0], heads, -1).float()
    descale = grouped.abs().amax(-1) / torch.finfo(dtype).max
    descale = torch.where(descale > 0, descale, torch.ones_like(descale))
    scale = descale.repeat_interleave(H // heads, dim=1)  # per head
    shape = [x.shape[0]] + [1] * (x.dim() - 1)
    shape[dim] = H
    q = (x.float() / scale.view(shape)).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype)
    return q, descale.contiguous()
