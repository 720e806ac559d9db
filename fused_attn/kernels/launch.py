"""What every launcher shares: the bundles of optional inputs (packed sequences, modifiers, block masks) and the
bundles the kernels take as they are (named tuples: Tile and Flags, constexpr; SeqArgs, Sched, ModArgs, MaskArgs),
the one FEATURES table the Flags come from, tile sources (pointer or TMA), grid dimensions, and `run`, which
launches a list of (kernel, grid, args, kwargs) and counts what it launched."""
import contextlib
import contextvars
import dataclasses
import math
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from .common import _add_bias, _unit_grad
from .configs import head_block, interpreter_active

# Kernel launches since import, per launcher call ("fwd", "bwd", "decode", with ":tma" / ":ptr") and per kernel;
# tests read it to prove the Triton kernels ran. Only launches that happened are counted.
launches = Counter()

LOG2E = math.log2(math.e)


@dataclass(frozen=True)
class Packed:
    """Packed sequences: q rows [cu_seqlens_q[b], cu_seqlens_q[b + 1]) attend to k rows [cu_seqlens_k[b],
    cu_seqlens_k[b + 1]) of (1, H, total, D) views; the max lengths size the grid."""
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int


@dataclass(frozen=True)
class ScoreMod:
    """A score function for the kernels (FlexAttention's score_mod): `fn(score, b, h, q_idx, kv_idx, *args)`, a
    @triton.jit function of the scaled score (q.k * scale) of query q_idx, key kv_idx of batch row b, query head h
    (tensors of broadcastable shapes), returning the new score; `grad(score, b, h, q_idx, kv_idx, *args)` its
    derivative with respect to `score`, elementwise (needed for a backward; None: no backward). bounded: the
    indices are clamped into the sequences (the kernels' last tiles run past the ends; those pairs are masked
    afterwards); False passes them as they are, contiguous, for a function that masks its own loads."""
    fn: object
    grad: object = None
    bounded: bool = True


@dataclass(frozen=True)
class Modifiers:
    """Score modifiers and dropout, each off by default. softcap > 0: scores capped to softcap * tanh(score /
    softcap); alibi_slopes: float32 (Hq,) or (B, Hq), bias -slope * |i + offset - j|; dropout_p > 0 with rng, the
    call's int64 [seed, offset] on the device: probabilities dropped (fused_attn/kernels/common.py `_keep`), kept ones scaled
    by 1 / (1 - p). bias: a float additive bias, expanded to (B, Hq, Sq, Sk) (stride 0 where broadcast), added to
    the scaled scores (common._add_bias, the kernels' one built-in score function); score_mod with score_args: a
    ScoreMod applied after softcap and ALiBi (not with a bias). sinks: float32 (Hq,), one logit per query head (in the
    units of the scaled scores) that joins each row's softmax denominator and nothing else (attention sinks).
    k_descale / v_descale: float32 (B, Hkv) of the same strides, an FP8 KV cache's dequantization factors
    (split-KV kernels); with q_descale too, FP8 q, k, v in the forward kernel (FlashAttention-3's FP8 forward)."""
    softcap: float = 0.0
    alibi_slopes: Optional[torch.Tensor] = None
    dropout_p: float = 0.0
    rng: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    score_mod: Optional[ScoreMod] = None
    score_args: tuple = ()
    sinks: Optional[torch.Tensor] = None
    k_descale: Optional[torch.Tensor] = None
    v_descale: Optional[torch.Tensor] = None
    q_descale: Optional[torch.Tensor] = None

    @property
    def dropout(self) -> bool:
        """Whether the kernels drop anything: dropout_p > 0 and a [seed, offset] to draw with."""
        return self.dropout_p > 0 and self.rng is not None


@dataclass(frozen=True)
class BlockTables:
    """A block mask as the kernels walk it (fused_attn.BlockMask builds it). Per (batch, head, query block): the key
    blocks it sees, as one int32 row [n_lead, n_full, n_trail, blocks in ascending order..., unused] of `kv`
    (B', H', n_q_blocks, 3 + n_kv_blocks padded to a multiple of 16) -- the n_full after the first n_lead are full
    (run without mask arithmetic, inside both lengths), the others masked; `q` is the transpose (per key block its
    query blocks) for the dK/dV kernel. B' and H' are 1 where the mask is the same for every batch row / head. A
    masked entry's value in `kv_slots` / `q_slots` (same shapes) is its block's slot in `bits` (slots, block_q,
    block_k) uint8, the pairs that take part, or -1 for a full block; blocks not listed are skipped. mask_mod: a
    @triton.jit mask function (b, h, q_idx, kv_idx, *mask_args) -> bool the kernels evaluate on the masked entries
    instead of reading bits."""
    kv: torch.Tensor
    kv_slots: torch.Tensor
    q: torch.Tensor
    q_slots: torch.Tensor
    bits: torch.Tensor
    block_q: int
    block_k: int
    mask_mod: object = None
    mask_args: tuple = ()


class Tile(NamedTuple):
    """A kernel's shape and schedule, its constexpr `C`: head dims and their power-of-two blocks, tile rows and keys,
    fp32 dots, the load path (TMA: False pointers, True host descriptors, 2 descriptors made in the kernel), the tile
    order and schedule (REVERSE, PERSISTENT, WARP_SPEC); the dK/dV pass (WITH_DK / WITH_DV); the split-KV kernel's
    rows (BLOCK_Q positions x PACK heads), COMBINE (split partials) and PAGE_SIZE."""
    HEAD_DIM: int
    HEAD_DIM_V: int
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_D: int
    BLOCK_DV: int
    FP32_DOT: bool = False
    TMA: object = False
    REVERSE: bool = False
    PERSISTENT: bool = False
    WARP_SPEC: bool = False
    WITH_DK: bool = True
    WITH_DV: bool = True
    BLOCK_Q: int = 1
    PACK: int = 1
    COMBINE: bool = False
    PAGE_SIZE: int = 0


class Flags(NamedTuple):
    """The optional features a launch uses, its constexpr `F` (`flags` fills it): each off by default, so a kernel
    compiles only the features it was given; the @triton.jit score and mask functions (None: off)."""
    HAS_LEFT: bool = False
    HAS_RIGHT: bool = False
    VARLEN: bool = False
    PAGED: bool = False
    HAS_SEQLENS: bool = False
    HAS_CU_K: bool = False
    SOFTCAP: bool = False
    ALIBI: bool = False
    DROPOUT: bool = False
    LISTED: bool = False
    BIAS_GRAD: bool = False
    HAS_SINKS: bool = False
    HAS_DLSE: bool = False
    FP8_KV: bool = False
    FP8: bool = False
    INVARIANT: bool = False
    SCORE_MOD: object = None
    SCORE_GRAD: object = None
    SCORE_BOUNDED: bool = True
    MASK_MOD: object = None


class SeqArgs(NamedTuple):
    """The sequences, kernel argument `seqs`: the launch's lengths, the diagonal offset, the window's left / right
    (-1: unbounded), and the packed offsets (CU_Q / CU_K, None: dense). In this bundle and the others, numbers come
    before pointers that may be None: Triton 3.6 misplaces a unit value (a constant: a stride of 1, a length of 1)
    that follows a None in a tuple argument."""
    seqlen_q: int
    seqlen_k: int
    offset: int
    left: int
    right: int
    CU_Q: object = None
    CU_K: object = None


class Sched(NamedTuple):
    """Which heads a launch covers (b * H + h from head_start, head_count of them), query heads per kv head, and
    the batch-invariant mode's keys per split (0: off), kernel argument `sched`."""
    head_start: int
    head_count: int
    n_heads: int
    group: int
    split_keys: int = 0


class ModArgs(NamedTuple):
    """Score modifiers, dropout, sinks and FP8 dequantization, kernel argument `mods` (modifier_args): a None
    pointer or a zero softcap turns its feature off. Numbers first (SeqArgs says why)."""
    slope_strides: tuple = (0, 0)
    descale_strides: tuple = (0, 0)
    cap_in: float = 0.0
    cap_out: float = 0.0
    threshold: int = 0
    drop_scale: float = 1.0
    SLOPES: object = None
    RNG: object = None
    SINKS: object = None
    Q_DESCALE: object = None
    K_DESCALE: object = None
    V_DESCALE: object = None
    SCORE_ARGS: tuple = ()


class MaskArgs(NamedTuple):
    """A block mask's tables as a kernel walks them, kernel argument `blocks` (block_args): the list's (batch, head,
    row) strides (0 where broadcast), the block sizes, list, slots, bits and the mask function's arguments."""
    strides: tuple = (0, 0, 0)
    block_q: int = 1
    block_k: int = 1
    TABLE: object = None
    SLOTS: object = None
    BITS: object = None
    MASK_ARGS: tuple = ()


# The optional features' constexpr flags, from the kernel arguments that carry them; each kernel names the ones it
# implements, so a flag is defined once for the forward, dK/dV, dQ, split-KV and combine kernels.
FEATURES = {
    "HAS_LEFT": lambda a: a["seqs"].left >= 0,
    "HAS_RIGHT": lambda a: a["seqs"].right >= 0,
    "VARLEN": lambda a: a["seqs"].CU_Q is not None,
    "PAGED": lambda a: a["PAGES"] is not None,
    "HAS_SEQLENS": lambda a: a["SEQLENS_K"] is not None,
    "HAS_CU_K": lambda a: a["seqs"].CU_K is not None,
    "SOFTCAP": lambda a: a["mods"].cap_out > 0,
    "ALIBI": lambda a: a["mods"].SLOPES is not None,
    "DROPOUT": lambda a: a["mods"].RNG is not None,
    "LISTED": lambda a: a["blocks"].TABLE is not None,
    "BIAS_GRAD": lambda a: a["DBIAS"] is not None,
    "HAS_SINKS": lambda a: a["mods"].SINKS is not None,
    "HAS_DLSE": lambda a: a["DLSE"] is not None,
    "FP8_KV": lambda a: a["mods"].K_DESCALE is not None,
    "FP8": lambda a: a["mods"].Q_DESCALE is not None,
    "INVARIANT": lambda a: a["sched"].split_keys > 0,
}


def flags(names, fns=None, **args) -> Flags:
    """A kernel's Flags: the named FEATURES of its arguments (`args`, by parameter name), and the score / mask
    functions (`fns`, from function_args) where it takes them."""
    return Flags(**{n: FEATURES[n](args) for n in names}, **(fns or {}))


def modifier_args(mods: Optional[Modifiers], scale: float) -> ModArgs:
    """A kernel's ModArgs: the slopes and their (batch, head) strides, dropout's rng and constants, the softcap's
    scale factors, the sinks, the score function's arguments (score_args) and the descales -- the FP8 forward's q,
    k, v ones, or an FP8 cache's k, v ones -- with their (batch, kv head) strides."""
    if mods is None:
        return ModArgs()
    slopes, cap, p = mods.alibi_slopes, mods.softcap, mods.dropout_p
    strides = (0, 0) if slopes is None else (slopes.stride(0), slopes.stride(1)) if slopes.dim() == 2 else (
        0, slopes.stride(0))
    drop = mods.dropout
    descale = mods.k_descale if mods.q_descale is None else mods.q_descale
    return ModArgs(slope_strides=strides, descale_strides=(0, 0) if descale is None else tuple(descale.stride()),
                   cap_in=scale / cap if cap else 0.0, cap_out=cap / scale if cap else 0.0,
                   threshold=dropout_threshold(p) if drop else 0, drop_scale=1.0 / (1.0 - p) if drop else 1.0,
                   SLOPES=slopes, RNG=mods.rng if drop else None, SINKS=mods.sinks, Q_DESCALE=mods.q_descale,
                   K_DESCALE=mods.k_descale, V_DESCALE=mods.v_descale, SCORE_ARGS=score_args(mods))


def score_args(mods: Modifiers) -> tuple:
    """The score function's arguments: a bias and its strides and sizes (common._add_bias), or the score_mod's."""
    if mods.bias is not None:
        return (mods.bias, *mods.bias.stride(), *mods.bias.shape[2:])
    return tuple(mods.score_args)


def block_args(blocks: Optional[BlockTables], transposed: bool = False) -> MaskArgs:
    """A kernel's MaskArgs (None turns LISTED off); transposed: the per-key-block tables."""
    if blocks is None:
        return MaskArgs()
    table, slots = (blocks.q, blocks.q_slots) if transposed else (blocks.kv, blocks.kv_slots)
    strides = tuple(0 if n == 1 else s for n, s in zip(table.shape[:2], table.stride()[:2])) + (table.stride(2),)
    return MaskArgs(strides, blocks.block_q, blocks.block_k, table, slots, blocks.bits, tuple(blocks.mask_args))


def block_tiles(cfg, blocks: Optional[BlockTables]):
    """cfg with tiles no larger than the block mask's blocks (powers of two: a tile then lies in one block)."""
    if blocks is None:
        return cfg
    return dataclasses.replace(cfg, block_m=min(cfg.block_m, blocks.block_q), block_n=min(cfg.block_n, blocks.block_k))


def function_args(mods: Optional[Modifiers], blocks: Optional[BlockTables]) -> dict:
    """The Flags fields that name a kernel's @triton.jit functions (SCORE_MOD, SCORE_GRAD, SCORE_BOUNDED, MASK_MOD;
    None: off). A bias is the built-in score function common._add_bias (its arguments: score_args)."""
    score = None if mods is None else mods.score_mod
    if mods is not None and mods.bias is not None:
        score = ScoreMod(_add_bias, _unit_grad, bounded=False)
    return dict(SCORE_MOD=score and score.fn, SCORE_GRAD=score and score.grad,
                SCORE_BOUNDED=score is None or score.bounded, MASK_MOD=None if blocks is None else blocks.mask_mod)


def dropout_threshold(p: float) -> int:
    """_keep keeps a probability where 24 random bits are >= this."""
    return round(p * 2 ** 24)


def fp32_dot(dtype: torch.dtype, invariant: bool = False):
    """fp32 inputs get IEEE dots; bf16 and FP8 under the interpreter get fp32 dots; the interpreter in the
    batch-invariant mode (`invariant`), row-by-row fp32 dots, 2 (see common._dot)."""
    if invariant and interpreter_active():
        return 2
    return dtype == torch.float32 or (dtype.itemsize < 2 or dtype == torch.bfloat16) and interpreter_active()


def tma_ok(*tensors) -> bool:
    """TMA can load these (B, H, S, D)-indexed views: last dim contiguous, base and other strides 16-byte aligned."""
    return all(t.stride(3) == 1 and t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0
                                                                    for s in t.stride()[:3]) for t in tensors)


def tile_source(t, tma: bool, block_rows: int, block_cols: int):
    """What a kernel's loads read t through: a (B, H, S, D) tensor descriptor of [block_rows, block_cols] boxes
    (TMA) or t itself (pointer loads)."""
    if tma:
        return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, block_rows, block_cols])
    return t


def tile_args(cfg, reverse: bool, q, k, v, do=None, packed: bool = False, invariant: bool = False):
    """One kernel's tile sources, Tile and launch options from its config: q (and dO) read in block_m rows, k and v
    in block_n rows, through TMA descriptors where cfg asks and all qualify (tma_ok; packed sequences take the
    pointer path, whose loads stop at each sequence's end), else as pointers; the tile order reversed where cfg asks
    for longest-first (or is persistent) and `reverse` says the last tiles are the heaviest; PERSISTENT where cfg
    asks and the call is not packed (a packed grid's tiles depend on the sequences). WARP_SPEC where cfg asks and
    the inputs qualify for TMA: the sources stay tensors, the kernel makes one descriptor per head (TMA == 2), the
    form Triton's warp specialization splits between consumer groups. invariant: the batch-invariant mode's
    launch (its dots: fp32_dot)."""
    tensors = (q, k, v) if do is None else (q, k, v, do)
    qualify = not packed and tma_ok(*tensors)
    ws = cfg.warp_specialize and qualify
    tma = cfg.tma and qualify and not ws
    rows = (cfg.block_m, cfg.block_n, cfg.block_n, cfg.block_m)
    src = tuple(tile_source(t, tma, r, head_block(t.shape[3])) for t, r in zip(tensors, rows))
    persistent = cfg.persistent and not packed
    D, Dv = q.shape[3], v.shape[3]
    return src, Tile(D, Dv, cfg.block_m, cfg.block_n, head_block(D), head_block(Dv), fp32_dot(q.dtype, invariant),
                     2 if ws else tma, (cfg.longest_first or persistent) and reverse, persistent, ws), dict(
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


# Programs of a persistent launch where the kernels run through the interpreter (few, so that each walks several
# tiles) and where no device is known (the compile-time gate's meta tensors: an H100 / H200's SMs).
INTERPRETER_PROGRAMS, DEFAULT_PROGRAMS = 3, 132


def tile_grid(tile: Tile, n_tiles: int, head_count: int, device):
    """The grid of a tiled kernel over n_tiles tiles of head_count heads: one program per tile (n_tiles,
    head_count), or, where the tile says PERSISTENT, one per SM (programs, 1), each walking tiles
    (common._walk_tile)."""
    if not tile.PERSISTENT:
        return (n_tiles, head_count)
    if interpreter_active():
        programs = INTERPRETER_PROGRAMS
    elif device.type == "cuda":
        programs = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        programs = DEFAULT_PROGRAMS
    return (max(1, min(programs, n_tiles * head_count)), 1)


def sm_count(device) -> int:
    """The streaming multiprocessors a launch on `device` can fill (a CUDA GPU's; 8 elsewhere, so that the CPU's
    interpreter runs make the same choices a small GPU would)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def reverse_tiles(left: int, right: int) -> bool:
    """Query tiles see more keys the later they are when only the window's right side is bounded (causal)."""
    return right >= 0 > left


def grid_dims(q, k, packed: Optional[Packed]):
    """(batch, Sq, Sk) the grid covers, the cu_seqlens pointers and a function giving each tensor's
    (batch, head, row, col) strides: packed sequences are rows of one batch slice, so their batch stride is 0."""
    if packed is None:
        return (q.shape[0], q.shape[2], k.shape[2]), (None, None), lambda t: tuple(t.stride())
    return ((packed.cu_seqlens_q.shape[0] - 1, packed.max_seqlen_q, packed.max_seqlen_k),
            (packed.cu_seqlens_q, packed.cu_seqlens_k), lambda t: (0, *t.stride()[1:]))


@contextlib.contextmanager
def _scratch(needed: bool, tensor):
    """Global scratch memory for kernels that make tensor descriptors (TMA == 2): Triton asks its allocator at
    launch. A torch allocation on `tensor`'s GPU for the launch's duration, where the caller has not set an
    allocator of its own."""
    from triton.runtime import _allocation
    if not needed or tensor.device.type != "cuda" or not isinstance(_allocation._allocator.get(),
                                                                      _allocation.NullAllocator):
        yield
        return
    token = _allocation._allocator.set(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8,
                                                                                  device=tensor.device))
    try:
        yield
    finally:
        _allocation._allocator.reset(token)


_stubbed = None  # inside stubbed_launches(): the list it yields


@contextlib.contextmanager
def stubbed_launches():
    """Inside the block, `run` builds and counts every launch but launches nothing: what a call costs on the host
    in our own Python (`python -m bench --host`). The kernels' outputs are left unwritten. Yields a list that gets
    (kernel name, its arguments) per launch not made (launch_values counts what the launch would pass)."""
    global _stubbed
    before, _stubbed = _stubbed, []
    try:
        yield _stubbed
    finally:
        _stubbed = before


_NO_TILE = Tile(0, 0, 0, 0, 0, 0)


def launch_values(args) -> int:
    """The values a launch passes (tuples flattened): what Triton's launcher binds and packs per call."""
    return sum(launch_values(a) if isinstance(a, tuple) else 1 for a in args)


def tile_of(kwargs) -> Tile:
    """A launch's Tile (kwargs["C"]), or one with every path flag off for kernels that take none."""
    return kwargs.get("C", _NO_TILE)


class Recording:
    """What a call launched (`runs`: (name, launch list) per run() call) and the buffers it made for its kernels to
    write (`buffers`: data pointer -> (tensor, fill), from `fresh`), for a replay (fused_attn/replay.py) to make the
    same launches again on other tensors."""

    def __init__(self):
        self.runs, self.buffers = [], {}


# Inside recording(): its Recording. Context-local, so a call recorded in one thread never takes in another's launches.
_recording = contextvars.ContextVar("fused_attn_recording", default=None)


@contextlib.contextmanager
def recording():
    """Inside the block, `run` also records what it launches and `fresh` the buffers made for it: yields the
    Recording."""
    token = _recording.set(Recording())
    try:
        yield _recording.get()
    finally:
        _recording.reset(token)


def fresh(t: torch.Tensor, fill=None) -> torch.Tensor:
    """t, a buffer made by this call for its kernels to write, as it starts: uninitialized (fill None) or filled
    with `fill`. Noted where a call is recorded: its replays make a new one of the same layout per call."""
    rec = _recording.get()
    if rec is not None and t.numel():
        rec.buffers[t.data_ptr()] = (t, fill)
    return t


def run(launch_list, name: str):
    """Launch each (kernel, grid, args, kwargs) and count what ran: the launcher call under `name` and its load
    path (`name:tma` / `name:ptr`), `name:persistent` / `name:warp_spec` where a kernel ran so, each kernel under its
    own name. An empty list launches and counts nothing."""
    rec = _recording.get()
    if rec is not None:
        rec.runs.append((name, launch_list))
    _launch(launch_list)
    launches.update(counted(launch_list, name))


def counted(launch_list, name: str) -> list:
    """The launch counter's keys a run of launch_list adds (see run)."""
    keys = [kernel.__name__ for kernel, *_ in launch_list]
    if launch_list:
        tiles = [tile_of(kw) for *_, kw in launch_list]
        keys += [name, f"{name}:{'tma' if any(t.TMA for t in tiles) else 'ptr'}"]
        keys += [f"{name}:{flag.lower()}" for flag in ("PERSISTENT", "WARP_SPEC") if any(getattr(t, flag) for t in tiles)]
    return keys


def _launch(launch_list):
    for kernel, grid, args, kwargs in launch_list:
        if _stubbed is not None:
            _stubbed.append((kernel.__name__, args))
        elif tile_of(kwargs).TMA == 2:
            with _scratch(True, args[0]):
                kernel[grid](*args, **kwargs)
        else:
            kernel.run(*args, grid=grid, warmup=False, **kwargs)


def relaunch(launch_list, keys: list):
    """Launch a list as run() does, its counter keys (`counted`) given: a replay (fused_attn/replay.py), on the
    host's lean path."""
    _launch(launch_list)
    for key in keys:  # Counter.update's own checks cost more than these few keys
        launches[key] += 1
