"""Block sizes, warps, stages, load path and tile order for every kernel, in one place.

Chosen by heuristics keyed by head dim, dtype and GPU generation (`cc`: the compute capability (major, minor),
None under the interpreter), and checked by the compile-time gate
(tests/aot_compile.py: wgmma / mma.sync, pipelined asynchronous loads, no spills, shared memory within the
target's limit). Sequence lengths never enter a config (and are never constexpr), so one compiled kernel serves
every length.
"""
import contextlib
import contextvars
import dataclasses
import logging
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
    tma: bool = False  # load q, k, v, dO through TMA tensor descriptors where the inputs qualify (sm_90+)
    longest_first: bool = False  # hand out the tiles that see the most keys first (causal, one-sided windows)
    split_dkdv: bool = False  # dK/dV kernel only: dV and dK in two launches, one accumulator each (large head dims)
    persistent: bool = False  # one program per SM walking the tiles, heaviest first (dense calls; bitwise the same)
    warp_specialize: bool = False  # the main loop warp-specialized over in-kernel TMA descriptors (sm_90+)


# Shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin), by compute capability. Consumer and
# workstation GPUs (sm_86 RTX 3090 / A6000, sm_89 RTX 4090 / L40, sm_120 RTX 5090) and unknown ones: 99 KB.
SMEM_PER_BLOCK = {(8, 0): 166_912, (8, 7): 166_912, (9, 0): 232_448, (10, 0): 232_448, (10, 3): 232_448}
SMEM_DEFAULT = 101_376


def smem_limit(cc) -> int:
    return SMEM_PER_BLOCK.get(tuple(cc), SMEM_DEFAULT)


MAX_GRID_Y = 65535  # CUDA's limit on grid axis 1, where the (batch * head) index goes


def head_chunks(n_heads_total: int):
    """(start, count) launches covering batch * heads within the grid-axis-1 limit (one launch in practice)."""
    return [(s, min(MAX_GRID_Y, n_heads_total - s)) for s in range(0, n_heads_total, MAX_GRID_Y)]


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launchers (plain Python: triton.cdiv is a JIT-wrapped function, ~5 us a call on the
    host, and the launchers call it several times per call)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for 0), as triton.next_power_of_2, without its call overhead."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def head_block(d: int) -> int:
    """Head dims are padded to the next power of two (>= 16, tl.dot's minimum) by masked loads."""
    return max(16, next_power_of_2(d))


def capability(device: torch.device):
    """(major, minor) of a CUDA device; None where the kernels run through the interpreter."""
    return None if interpreter_active() else torch.cuda.get_device_capability(device)


def tma_capable(cc) -> bool:
    """TMA tensor descriptors: Hopper and newer, and the interpreter (which runs them on the CPU)."""
    return cc is None or cc[0] >= 9


# Scoped overrides of the defaults below, for benchmarks and tuning (`use`); never set at import.
_override = contextvars.ContextVar("fused_attn_config_override", default={})


OPTIONS = ("tma", "longest_first", "persistent", "warp_specialize")


def overrides() -> tuple:
    """What `use` set here, as (option, value) pairs: part of a replayed call's key (fused_attn/replay.py)."""
    given = _override.get()
    return tuple(given.items()) if given else ()


@contextlib.contextmanager
def use(*, tma=None, longest_first=None, persistent=None, warp_specialize=None):
    """Within the block, kernels launched with the default configs take the TMA (tma=True) or pointer (False) load
    path, the given tile order, persistent programs (persistent=True) or one program per tile, and
    warp-specialized kernels (warp_specialize=True: TMA loads by a producer warp group, sm_90+); None keeps
    configs.py's choice. An explicit `config=` passed to a launcher wins.

        with fused_attn.kernels.configs.use(tma=True, persistent=True):
            out = fused_attn.attention(q, k, v, causal=True)
    """
    given = dict(tma=tma, longest_first=longest_first, persistent=persistent, warp_specialize=warp_specialize)
    for name, value in given.items():
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name} must be True, False or None, got {value!r}")
    token = _override.set({**_override.get(), **{k: v for k, v in given.items() if v is not None}})
    try:
        yield
    finally:
        _override.reset(token)


def _choice(cc, packed: bool = False) -> dict:
    """Load path, tile order and schedule: configs.py's defaults (pointer path, natural order, a program per tile --
    until a GPU run has measured the alternatives), or what `use` set; packed sequences always take the pointer path
    and a program per tile."""
    choice = {**dict.fromkeys(OPTIONS, False), **_override.get()}
    choice["tma"] = choice["tma"] and not packed
    choice["persistent"] = choice["persistent"] and not packed
    choice["warp_specialize"] = choice["warp_specialize"] and not packed
    if choice["persistent"] and cc is not None and cc[0] >= 9:  # the pointer path's addresses spill (gate) there
        choice["tma"] = True
    for name, what in (("tma", "the TMA load path"), ("warp_specialize", "warp specialization")):
        if choice[name] and not tma_capable(cc):
            raise ValueError(f"{what} needs compute capability 9.0 or newer, this GPU has {cc}")
    return choice


def _stages(resident: int, per_stage: int, cc, most: int) -> int:
    """Pipeline depth that fits the target's shared memory, keeping ~12% for the compiler's own buffers."""
    return max(1, min(most, (smem_limit(cc) * 7 // 8 - resident) // max(per_stage, 1)))


# The interpreter's tiles: small, so small test shapes still cross several of them.
INTERPRETER = (32, 32, 4, 1)

# fp16 / bf16 tiles by GPU class and padded head dim (64 also serves 16 and 32): (block_m, block_n, warps, stages).
# The Hopper and sm_80 entries are tiles the compile-time gate (tests/aot_compile.py) finds clean with triton 3.6
# and 3.9 -- every dot a wgmma (sm_90) or mma.sync (sm_80), pipelined asynchronous loads, no spills -- picked from
# a few candidates each, the largest clean one; the 99 KB entries the same way (mma.sync, on sm_86 / sm_89 /
# sm_120, Triton 3.9 and 3.6). The pointer
# path needs registers for addresses that TMA does not, so on Hopper it gets fewer stages or smaller tiles.
# sm_100 takes the Hopper entries, checked by the gate with Triton 3.9 (tcgen05 MMAs, tensor memory, pipelined, no
# spills), but where BLACKWELL overrides them. None has been timed on a GPU yet: `python -m bench.tune` does that.
HOPPER = {
    "fwd": {("ptr", 64): (128, 64, 8, 3), ("ptr", 128): (128, 64, 8, 2), ("ptr", 256): (64, 32, 8, 2),
            ("tma", 64): (128, 64, 8, 4), ("tma", 128): (128, 64, 8, 4), ("tma", 256): (64, 64, 8, 2),
            # warp-specialized: 4 warps per consumer group (two groups of 64 rows, a producer group beside them)
            ("ws", 64): (128, 128, 4, 2), ("ws", 128): (128, 128, 4, 2), ("ws", 256): (128, 64, 4, 2),
            ("ws-persistent", 256): (128, 32, 4, 2)},  # 128x64: 295 KB of shared memory
    "dkdv": {64: (32, 64, 8, 3), 128: (32, 64, 8, 2), 256: (32, 64, 8, 2),
             ("ws", 64): (64, 64, 4, 2), ("ws", 128): (32, 64, 4, 3),  # 64x64 spills 148 bytes (Triton 3.6)
             ("ws-persistent", 128): (16, 64, 4, 2),  # 32x64 spills 8 bytes (Triton 3.6)
             ("persistent", 256): (16, 64, 8, 2)},  # 32x64 spills 16 bytes (GQA 8, Triton 3.6)
    "dq": {64: (64, 64, 4, 3), 128: (64, 64, 8, 3), 256: (64, 32, 8, 2),
           # warp-specialized: 64-row tiles (128 rows fail in Triton's pass: "unsupported load type")
           ("ws", 64): (64, 64, 4, 2), ("ws", 128): (64, 64, 4, 2), ("ws", 256): (64, 16, 4, 3),
           ("packed", 256): (64, 16, 8, 2)},  # the packed prologue's registers: 64x32 spills 108 bytes
}
# sm_100 (B200 / GB200): Hopper's entries but where the gate found them spilling with tcgen05 MMAs (D = 256 dK/dV:
# 32x64 spilled 8 bytes under MHA; TMA at D = 128, GQA 8: 2 stages spilled 12 bytes, 3 are clean).
# TMA at D = 128: 128x64 tiles spill 8-20 bytes (4 or 8 warps, 2-4 stages; persistent or not), 128x32 are clean.
BLACKWELL = {"fwd": {("tma", 128): (128, 32, 8, 4)}, "dkdv": {256: (16, 64, 8, 2), ("tma", 128): (32, 64, 8, 3)}}
AMPERE = {  # sm_80 / sm_87: mma.sync, 163 KB of shared memory per block; 3 stages to get double buffers
    "fwd": {64: (128, 64, 4, 3), 128: (128, 32, 8, 3), 256: (64, 32, 8, 3)},
    "dkdv": {64: (32, 32, 4, 3), 128: (32, 64, 8, 3), 256: (32, 64, 8, 3)},
    "dq": {64: (64, 64, 4, 3), 128: (64, 64, 8, 3), 256: (64, 32, 8, 3)},
}
SMALL = {  # sm_86 / sm_89 / sm_120 and unknown GPUs: mma.sync, 99 KB of shared memory per block; 3 stages (double
    # buffers) everywhere, so the large head dims take narrow streamed tiles
    "fwd": {64: (128, 64, 8, 3), 128: (128, 32, 8, 3), 256: (64, 16, 8, 3)},
    "dkdv": {64: (32, 32, 4, 3), 128: (32, 64, 8, 3), 256: (16, 32, 8, 3)},  # 16x64: dV spilled 16 bytes, sm_120
    "dq": {64: (64, 64, 4, 3), 128: (64, 32, 8, 3), 256: (64, 16, 8, 3)},
}


# The GPUs whose tables the compile-time gate checks (sm_100 takes Hopper's, unchecked yet); any other gets the
# 99 KB tables (the most conservative), with one log line per capability.
KNOWN_CC = {(8, 0), (8, 6), (8, 7), (8, 9), (9, 0), (10, 0), (10, 3), (12, 0), (12, 1)}
_unknown_seen = set()


def _path(choice: dict, packed: bool) -> str:
    """The load path (and schedule) a config's tiles are chosen for."""
    if packed:
        return "packed"
    if choice["warp_specialize"]:
        return "ws-persistent" if choice["persistent"] else "ws"
    if choice["persistent"] and choice["tma"]:
        return "persistent"
    return "tma" if choice["tma"] else "ptr"


# Where a table has no entry for a path, the next one's: a persistent warp-specialized kernel takes the
# warp-specialized tiles, those and persistent kernels (TMA) the TMA tiles; packed sequences the pointer tiles;
# finally the head dim's entry.
_FALLBACK = {"ws-persistent": "ws", "ws": "tma", "persistent": "tma", "packed": "ptr"}


def _entry(table: dict, path: str, d: int):
    while path is not None:
        if (path, d) in table:
            return table[(path, d)]
        path = _FALLBACK.get(path)
    return table.get(d)


def _tiles(kind: str, cc, head_dim: int, head_dim_v: int, path: str):
    d = max(64, head_block(head_dim), head_block(head_dim_v))
    if tuple(cc) not in KNOWN_CC:
        if tuple(cc) not in _unknown_seen:
            _unknown_seen.add(tuple(cc))
            logging.getLogger("fused_attn").warning("fused_attn: compute capability %s.%s has no tuned tables; "
                                                    "using the 99 KB GPUs' (the most conservative)", *cc)
        return SMALL[kind][d]
    blackwell = _entry(BLACKWELL.get(kind, {}), path, d) if cc[0] == 10 else None
    if blackwell:
        return blackwell
    if cc[0] in (9, 10):  # an entry for the path where one differs, else the head dim's
        return _entry(HOPPER[kind], path, d)
    return (AMPERE if smem_limit(cc) > SMEM_DEFAULT else SMALL)[kind][d]


def forward_config(head_dim: int, head_dim_v: int, dtype: torch.dtype, cc, packed: bool = False) -> KernelConfig:
    """One program per query tile: q resident, k and v tiles streamed (num_stages deep). packed: for packed
    sequences (pointer path, whatever `use` asks)."""
    choice = _choice(cc, packed)
    if cc is None:
        return KernelConfig(*INTERPRETER, **choice)
    if dtype.itemsize <= 2:  # fp16 / bf16, and FP8 (half the bytes per tile: the same tiles fit)
        return KernelConfig(*_tiles("fwd", cc, head_dim, head_dim_v, _path(choice, packed)), **choice)
    # fp32 (IEEE dots, no tensor cores): tiles that fit shared memory; the gate prints their spills.
    bd, bdv = head_block(head_dim), head_block(head_dim_v)
    block_m, block_n = 64, 64 if max(bd, bdv) <= 128 else 32
    if max(bd, bdv) > 128 and smem_limit(cc) <= SMEM_DEFAULT:
        block_m = 32
    stages = _stages(block_m * bd * 4, block_n * (bd + bdv) * 4, cc, 3)
    return KernelConfig(block_m, block_n, 8 if bd >= 128 else 4, stages, **choice)


def invariant_config(head_dim: int, head_dim_v: int, dtype: torch.dtype, cc, split_keys: int) -> KernelConfig:
    """The batch-invariant mode's tiles, taken by every path that computes a row -- the dense and packed forward
    and the split-KV kernels -- so that each runs the same MMA on the same key tiles: the packed forward's (pointer
    loads, a program per tile, whatever `use` asks), its key tile halved until it divides split_keys, and on a GPU
    at most 64 rows from D = 128 on and 16 keys above it: the merged splits' accumulator lives beside the split's
    own, and larger tiles spill on sm_80 and sm_90 (the compile-time gate; 32-row tiles at D = 256 lose wgmma)."""
    cfg = forward_config(head_dim, head_dim_v, dtype, cc, packed=True)
    block_n = cfg.block_n
    while split_keys % block_n:
        block_n //= 2
    d = max(head_block(head_dim), head_block(head_dim_v))
    block_m = cfg.block_m if cc is None or d < 128 else min(cfg.block_m, 64)
    if cc is not None and d > 128:
        block_n = min(block_n, 16)
    return dataclasses.replace(cfg, block_m=block_m, block_n=block_n)


def split_dkdv(head_dim: int, head_dim_v: int) -> bool:
    """dK and dV in two launches above D = 128: both accumulators in one program spill (compile-time gate)."""
    return max(head_block(head_dim), head_block(head_dim_v)) > 128


def backward_config(head_dim: int, head_dim_v: int, dtype: torch.dtype, cc, packed: bool = False,
                    dropout: bool = False):
    """(dK/dV config, dQ config). dK/dV keeps block_n keys resident and streams tiles of block_m queries (and dO);
    dQ keeps block_m queries resident and streams tiles of block_n keys (and values). Above D = 128 the dK/dV
    kernel runs as two launches (dV, then dK), one accumulator each: both spill; and neither it nor a persistent
    dQ is warp-specialized there, nor persistent on sm_100. packed as in forward_config.
    dropout: the Philox state's registers on top (with softcap and ALiBi, the compile-time gate saw 36-212 bytes
    of spills with the usual tiles), so half the tiles: dQ's streamed block_n, and dK/dV's streamed block_m on
    sm_90 (its 64 resident rows feed wgmma), its resident block_n elsewhere."""
    choice = _choice(cc, packed)
    split = split_dkdv(head_dim, head_dim_v)
    # Warp-specialized where the gate finds it clean: above D = 128 the dK launch spills at every tile tried (8-44
    # bytes, Triton 3.6), and so does the persistent dQ (24-156 bytes at 64x16 / 64x32); those drop the flag.
    ws = choice["warp_specialize"]
    kv_choice = dict(choice, warp_specialize=ws and not split)
    q_choice = dict(choice, warp_specialize=ws and not (split and choice["persistent"]))
    if split and cc is not None and cc[0] == 10:  # sm_100: a persistent dK or dQ spills above D = 128 (96-420
        # bytes at every tile tried: the accumulator leaves tensor memory between the walk's tiles), so one program
        # per tile there
        kv_choice["persistent"] = q_choice["persistent"] = False
    if cc is None:
        return KernelConfig(*INTERPRETER, **kv_choice), KernelConfig(*INTERPRETER, **q_choice)
    if dtype.itemsize == 2:
        cfgs = (KernelConfig(*_tiles("dkdv", cc, head_dim, head_dim_v, _path(kv_choice, packed)), split_dkdv=split,
                             **kv_choice),
                KernelConfig(*_tiles("dq", cc, head_dim, head_dim_v, _path(q_choice, packed)), **q_choice))
        if dropout:  # wgmma needs 64 resident rows on sm_90; mma.sync does not
            side = "block_m" if cc[0] >= 9 else "block_n"
            cfgs = (dataclasses.replace(cfgs[0], **{side: max(16, getattr(cfgs[0], side) // 2)}),
                    dataclasses.replace(cfgs[1], block_n=max(16, cfgs[1].block_n // 2)))
        return cfgs
    bd, bdv = head_block(head_dim), head_block(head_dim_v)
    block_m, block_n = (32, 64) if max(bd, bdv) <= 64 else (16, 32)
    if split and smem_limit(cc) <= SMEM_DEFAULT:
        block_n = 16
    tile = max(block_m, block_n) * (bd + bdv) * 4
    tiles = (block_m, block_n, 8 if bd >= 128 else 4, _stages(tile, tile, cc, 3))
    return KernelConfig(*tiles, split_dkdv=split, **kv_choice), KernelConfig(*tiles, **q_choice)
