"""The Triton launchers as torch.library custom ops, so torch.compile(fullgraph=True) traces through
fused_attn (the compiler sees opaque ops with fake implementations, not Triton launches)."""
from typing import Tuple

import torch
from torch import Tensor

from . import kernels


def _forward_buffers(q, v, layout):
    B, Hq, Sq, _ = q.shape
    Dv = v.shape[-1]
    if layout == "bshd":  # the output in (B, S, H, D) memory order, like the inputs
        out = q.new_empty(B, Sq, Hq, Dv).transpose(1, 2)
    else:
        out = q.new_empty(B, Hq, Sq, Dv)
    lse = torch.empty(B, Hq, Sq, device=q.device, dtype=torch.float32)
    stats = torch.empty(B, Hq, Sq, 2, device=q.device, dtype=torch.float32)
    return out, lse, stats


@torch.library.custom_op("fused_attn::forward", mutates_args=())
def forward(q: Tensor, k: Tensor, v: Tensor, scale: float, offset: int, left: int, right: int,
            layout: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(B, H, S, D)-indexed q, k, v -> out (laid out as `layout`), lse, stats (kernels.attention_forward)."""
    out, lse, stats = _forward_buffers(q, v, layout)
    kernels.attention_forward(q, k, v, out, lse, stats, scale, offset, left, right)
    return out, lse, stats


@forward.register_fake
def _(q, k, v, scale, offset, left, right, layout):
    return _forward_buffers(q, v, layout)


@torch.library.custom_op("fused_attn::backward", mutates_args=())
def backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, stats: Tensor, scale: float,
             offset: int, left: int, right: int) -> Tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv (kernels.attention_backward)."""
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty(stats.shape[:-1], device=q.device, dtype=torch.float32)
    kernels.attention_backward(dout, q, k, v, out, stats, dq, dk, dv, delta, scale, offset, left, right)
    return dq, dk, dv


@backward.register_fake
def _(dout, q, k, v, out, stats, scale, offset, left, right):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
