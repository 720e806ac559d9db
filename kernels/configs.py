"""Block sizes, warps and stages for every kernel, in one place.

Chosen by heuristics keyed by head dim, dtype and GPU generation. Sequence lengths never enter a config
(and are never constexpr), so one compiled kernel serves every length.
"""
from dataclasses import dataclass

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def _probe():
    pass


def interpreter_active() -> bool:
    """True when this package's kernels were defined under TRITON_INTERPRET=1 (they then run on the CPU)."""
    return isinstance(_probe, InterpretedFunction)


@dataclass(frozen=True)
class KernelConfig:
    block_m: int  # query rows per tile
    block_n: int  # key rows per tile
    num_warps: int
    num_stages: int


# Usable shared memory per SM, by compute-capability major.minor (bytes, with ~10% headroom for the compiler).
_SMEM = {(9, 0): 200_000, (8, 0): 150_000, (8, 7): 150_000, (10, 0): 200_000}
_SMEM_DEFAULT = 90_000


MAX_GRID_Y = 65535  # CUDA's limit on grid axis 1, where the (batch * head) index goes


def head_chunks(n_heads_total: int):
    """(start, count) launches covering batch * heads within the grid-axis-1 limit (one launch in practice)."""
    return [(s, min(MAX_GRID_Y, n_heads_total - s)) for s in range(0, n_heads_total, MAX_GRID_Y)]


def head_block(d: int) -> int:
    """Head dims are padded to the next power of two (>= 16, tl.dot's minimum) by masked loads."""
    return max(16, triton.next_power_of_2(d))


def _stages(resident: int, per_stage: int, smem: int, most: int) -> int:
    return max(1, min(most, (smem - resident) // max(per_stage, 1)))


def capability(device: torch.device):
    """(major, minor) of a CUDA device; None where the kernels run through the interpreter."""
    return None if interpreter_active() else torch.cuda.get_device_capability(device)


def forward_config(head_dim: int, head_dim_v: int, dtype: torch.dtype, cap) -> KernelConfig:
    if cap is None:  # interpreter: small tiles, so small test shapes still cross several of them
        return KernelConfig(32, 32, 4, 1)
    bd, bdv, elt = head_block(head_dim), head_block(head_dim_v), dtype.itemsize
    big = max(bd, bdv) > 128 or elt == 4
    block_m, block_n = (64, 64) if big else (128, 64)
    if max(bd, bdv) > 128 and elt == 4:
        block_n = 32
    warps = 8 if bd >= 128 or block_m == 128 and bd > 64 else 4
    stages = _stages(block_m * bd * elt, block_n * (bd + bdv) * elt, _SMEM.get(cap, _SMEM_DEFAULT), 4)
    return KernelConfig(block_m, block_n, warps, stages)


def backward_config(head_dim: int, head_dim_v: int, dtype: torch.dtype, cap) -> KernelConfig:
    """One config for both backward kernels: dK/dV keeps block_n keys resident and loops over tiles of block_m
    queries; dQ keeps block_m queries resident and loops over tiles of block_n keys."""
    if cap is None:
        return KernelConfig(32, 32, 4, 1)
    bd, bdv, elt = head_block(head_dim), head_block(head_dim_v), dtype.itemsize
    big = max(bd, bdv) > 128 or elt == 4
    block_m, block_n = (32, 64) if big else (64, 64)
    if max(bd, bdv) > 128 and elt == 4:
        block_m, block_n = 16, 32
    warps = 8 if bd >= 128 else 4
    tile = max(block_m, block_n) * (bd + bdv) * elt
    stages = _stages(tile, tile, _SMEM.get(cap, _SMEM_DEFAULT), 3)
    return KernelConfig(block_m, block_n, warps, stages)
