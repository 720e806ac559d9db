"""A @triton.jit mask function's blocks: how many pairs of each (query block, key block) it lets take part, the
counts fused_attn.create_block_mask classifies into empty / partial / full blocks. The function is evaluated
where the attention kernels evaluate it (common._block_bits), on the device, with the same arguments."""
import torch
import triton
import triton.language as tl

from .common import _bounded
from .configs import cdiv
from .launch import run


@triton.jit
def _count_kernel(COUNTS, MASK_ARGS, n_heads, seqlen_q, seqlen_k, stride_cb, stride_ch, stride_cq,
                  BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, MASK_MOD: tl.constexpr):
    """One (query block, key block, b * H + h): the number of pairs inside both lengths that MASK_MOD lets take
    part."""
    qb, kb, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // n_heads, bh % n_heads
    i = (qb * BLOCK_Q + tl.arange(0, BLOCK_Q))[:, None]
    j = (kb * BLOCK_K + tl.arange(0, BLOCK_K))[None, :]
    qi, kj = _bounded(i, j, seqlen_q, seqlen_k)
    ok = MASK_MOD(b, h, qi, kj, *MASK_ARGS)
    ok = ok & (i < seqlen_q) & (j < seqlen_k)
    n = tl.sum(tl.sum(ok.to(tl.int32), 1), 0)
    tl.store(COUNTS + b.to(tl.int64) * stride_cb + h * stride_ch + qb * stride_cq + kb, n)


def count_visible(mask_mod, mask_args, batch: int, heads: int, seqlen_q: int, seqlen_k: int, block_q: int,
                  block_k: int, device) -> torch.Tensor:
    """(batch, heads, query blocks, key blocks) int32: the pairs of each block that mask_mod(b, h, q_idx, kv_idx,
    *mask_args) lets take part."""
    nq, nk = cdiv(seqlen_q, block_q), cdiv(seqlen_k, block_k)
    counts = torch.empty(batch, heads, nq, nk, dtype=torch.int32, device=device)
    run([(_count_kernel, (nq, nk, batch * heads),
          (counts, tuple(mask_args), heads, seqlen_q, seqlen_k, *counts.stride()[:3]),
          dict(BLOCK_Q=block_q, BLOCK_K=block_k, MASK_MOD=mask_mod))], "blockmask")
    return counts
