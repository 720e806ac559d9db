"""What every launcher shares: the bundles of optional inputs (packed sequences, modifiers), the constexpr flags
they turn into (one @triton.heuristics table for every kernel), tile sources (pointer or TMA), grid dimensions,
and `run`, which launches a list of (kernel, grid, args, kwargs) and counts what it launched."""
import contextlib
import dataclasses
import math
from collections import Counter
from dataclasses import dataclass
from typing import Optional

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


def block_args(blocks: Optional[BlockTables], transposed: bool = False):
    """A kernel's block-mask arguments: pointers (table, slots, bits) -- None turns LISTED off -- and (its
    batch, head and row strides (0 where broadcast), block_q, block_k); transposed: the per-key-block tables."""
    if blocks is None:
        return (None, None, None), (0, 0, 0, 1, 1)
    table, slots = (blocks.q, blocks.q_slots) if transposed else (blocks.kv, blocks.kv_slots)
    strides = tuple(0 if n == 1 else s for n, s in zip(table.shape[:2], table.stride()[:2])) + (table.stride(2),)
    return (table, slots, blocks.bits), strides + (blocks.block_q, blocks.block_k)


def block_tiles(cfg, blocks: Optional[BlockTables]):
    """cfg with tiles no larger than the block mask's blocks (powers of two: a tile then lies in one block)."""
    if blocks is None:
        return cfg
    return dataclasses.replace(cfg, block_m=min(cfg.block_m, blocks.block_q), block_n=min(cfg.block_n, blocks.block_k))


# The optional features' constexpr flags, from the launch arguments that carry them; each kernel takes the ones it
# implements (`features`), so a flag is defined once for the forward, dK/dV, dQ and split-KV kernels.
FEATURES = {
    "HAS_LEFT": lambda args: args["left"] >= 0,
    "HAS_RIGHT": lambda args: args["right"] >= 0,
    "VARLEN": lambda args: args["CU_Q"] is not None,
    "PAGED": lambda args: args["PAGES"] is not None,
    "HAS_SEQLENS": lambda args: args["SEQLENS_K"] is not None,
    "HAS_CU_K": lambda args: args["CU_K"] is not None,
    "SOFTCAP": lambda args: args["cap_out"] > 0,
    "ALIBI": lambda args: args["SLOPES"] is not None,
    "DROPOUT": lambda args: args["RNG"] is not None,
    "LISTED": lambda args: args["MASK_TABLE"] is not None,
    "BIAS_GRAD": lambda args: args["DBIAS"] is not None,
    "HAS_SINKS": lambda args: args["SINKS"] is not None,
    "HAS_DLSE": lambda args: args["DLSE"] is not None,
    "FP8_KV": lambda args: args["K_DESCALE"] is not None,
    "FP8": lambda args: args["Q_DESCALE"] is not None,
    "INVARIANT": lambda args: args["split_keys"] > 0,
}


def features(*names):
    """@triton.heuristics for the named FEATURES."""
    return triton.heuristics({n: FEATURES[n] for n in names})


def modifier_args(mods: Optional[Modifiers], scale: float):
    """A kernel's modifier arguments: pointers (SLOPES, RNG), slope strides (batch, head), and (cap_in, cap_out,
    threshold, drop_scale); a None pointer / softcap 0 turns its constexpr flag off."""
    mods = mods or Modifiers()
    slopes, cap, p = mods.alibi_slopes, mods.softcap, mods.dropout_p
    strides = (0, 0) if slopes is None else (slopes.stride(0), slopes.stride(1)) if slopes.dim() == 2 else (
        0, slopes.stride(0))
    drop = mods.dropout
    return ((slopes, mods.rng if drop else None), strides,
            (scale / cap if cap else 0.0, cap / scale if cap else 0.0, dropout_threshold(p) if drop else 0,
             1.0 / (1.0 - p) if drop else 1.0))


def function_args(mods: Optional[Modifiers], blocks: Optional[BlockTables]):
    """A kernel's @triton.jit functions: the argument tuples (SCORE_ARGS, MASK_ARGS) and the constexpr kwargs that
    name the functions (SCORE_MOD, SCORE_GRAD, MASK_MOD; None: off). A bias is the built-in score function
    common._add_bias over the bias and its four strides."""
    mods = mods or Modifiers()
    score, args = mods.score_mod, mods.score_args
    if mods.bias is not None:
        score, args = ScoreMod(_add_bias, _unit_grad, bounded=False), (mods.bias, *mods.bias.stride(),
                                                                        *mods.bias.shape[2:])
    mask_mod, mask_args = (None, ()) if blocks is None else (blocks.mask_mod, blocks.mask_args)
    return (tuple(args), tuple(mask_args)), dict(SCORE_MOD=score and score.fn, SCORE_GRAD=score and score.grad,
                                                 SCORE_BOUNDED=score is None or score.bounded, MASK_MOD=mask_mod)


def fp8_args(mods: Optional[Modifiers]):
    """The FP8 forward's descale pointers (Q, K, V; None turns FP8 off) and their (batch, kv head) strides."""
    if mods is None or mods.q_descale is None:
        return (None, None, None), (0, 0)
    return (mods.q_descale, mods.k_descale, mods.v_descale), mods.q_descale.stride()


def dropout_threshold(p: float) -> int:
    """_keep keeps a probability where 24 random bits are >= this."""
    return round(p * 2 ** 24)


def fp32_dot(dtype: torch.dtype) -> bool:
    """fp32 inputs get IEEE dots; bf16 and FP8 under the interpreter get fp32 dots (see common._dot)."""
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


def tile_args(cfg, reverse: bool, q, k, v, do=None, packed: bool = False):
    """One kernel's tile sources and launch kwargs from its config: q (and dO) read in block_m rows, k and v in
    block_n rows, through TMA descriptors where cfg asks and all qualify (tma_ok; packed sequences take the pointer
    path, whose loads stop at each sequence's end), else as pointers; the tile order reversed where cfg asks for
    longest-first (or is persistent) and `reverse` says the last tiles are the heaviest; PERSISTENT where cfg asks
    and the call is not packed (a packed grid's tiles depend on the sequences). WARP_SPEC where cfg asks and the
    inputs qualify for TMA: the sources stay tensors, the kernel makes one descriptor per head (TMA == 2), the form
    Triton's warp specialization splits between consumer groups."""
    tensors = (q, k, v) if do is None else (q, k, v, do)
    qualify = not packed and tma_ok(*tensors)
    ws = cfg.warp_specialize and qualify
    tma = cfg.tma and qualify and not ws
    rows = (cfg.block_m, cfg.block_n, cfg.block_n, cfg.block_m)
    src = tuple(tile_source(t, tma, r, head_block(t.shape[3])) for t, r in zip(tensors, rows))
    persistent = cfg.persistent and not packed
    return src, dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, TMA=2 if ws else tma, PERSISTENT=persistent,
                     WARP_SPEC=ws, REVERSE=(cfg.longest_first or persistent) and reverse, num_warps=cfg.num_warps,
                     num_stages=cfg.num_stages)


# Programs of a persistent launch where the kernels run through the interpreter (few, so that each walks several
# tiles) and where no device is known (the compile-time gate's meta tensors: an H100 / H200's SMs).
INTERPRETER_PROGRAMS, DEFAULT_PROGRAMS = 3, 132


def tile_grid(kwargs, n_tiles: int, head_count: int, device):
    """The grid of a tiled kernel over n_tiles tiles of head_count heads: one program per tile (n_tiles,
    head_count), or, where kwargs say PERSISTENT, one per SM (programs, 1), each walking tiles (common._walk_tile)."""
    if not kwargs["PERSISTENT"]:
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


def _kernel_name(kernel) -> str:
    return getattr(kernel, "__name__", None) or kernel.fn.__name__  # under @triton.heuristics: .fn


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
    (kernel name, number of positional launch arguments) per launch not made."""
    global _stubbed
    before, _stubbed = _stubbed, []
    try:
        yield _stubbed
    finally:
        _stubbed = before


def run(launch_list, name: str):
    """Launch each (kernel, grid, args, kwargs) and count what ran: the launcher call under `name` and its load
    path (`name:tma` / `name:ptr`), `name:persistent` / `name:warp_spec` where a kernel ran so, each kernel under its
    own name. An empty list launches and counts nothing."""
    for kernel, grid, args, kwargs in launch_list:
        if _stubbed is not None:
            _stubbed.append((_kernel_name(kernel), len(args)))
        else:
            with _scratch(kwargs.get("TMA") == 2, args[0]):
                kernel[grid](*args, **kwargs)
        launches[_kernel_name(kernel)] += 1
    if launch_list:
        launches[name] += 1
        launches[f"{name}:{'tma' if any(kw.get('TMA') for *_, kw in launch_list) else 'ptr'}"] += 1
        for flag in ("PERSISTENT", "WARP_SPEC"):
            if any(kw.get(flag) for *_, kw in launch_list):
                launches[f"{name}:{flag.lower()}"] += 1
