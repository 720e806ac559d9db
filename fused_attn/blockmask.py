"""Masks of any shape, FlexAttention's model: a mask function evaluated once into a BlockMask -- per (batch, head,
query block) the key blocks it sees, split into partial blocks (their element mask stored) and full ones -- that the
kernels walk instead of a contiguous range. The mask data are runtime values: a new mask never recompiles."""
from dataclasses import dataclass
from typing import Callable, Tuple

import torch

from ._args import check_device, check_mod_args
from .kernels import BlockTables, count_visible

CHUNK = 1 << 24  # (b, h, q, kv) pairs a mask function is evaluated on at once: bounded memory for long sequences


def _block_size(BLOCK_SIZE) -> Tuple[int, int]:
    sizes = (BLOCK_SIZE, BLOCK_SIZE) if isinstance(BLOCK_SIZE, int) else tuple(BLOCK_SIZE)
    if len(sizes) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) for s in sizes):
        raise TypeError(f"BLOCK_SIZE must be an int or a pair of ints, got {BLOCK_SIZE!r}")
    for s in sizes:
        if s < 16 or s & (s - 1):
            raise ValueError(f"BLOCK_SIZE must be a power of two >= 16 (the kernels' tiles divide it), got {s}")
    return sizes


def _vmapped(mask_mod, n_args: int):
    """mask_mod(b, h, q_idx, kv_idx, *args) written for one pair, vectorized over 1-D b, h, q_idx, kv_idx (as
    FlexAttention's create_block_mask does): returns (B, H, Q, KV)."""
    fn = mask_mod
    for dims in ((None, None, None, 0), (None, None, 0, None), (None, 0, None, None), (0, None, None, None)):
        fn = torch.vmap(fn, in_dims=dims + (None,) * n_args, out_dims=0)
    return fn


def evaluate(mask_mod, batch: int, heads: int, rows, kv_len: int, device, mod_args=()) -> torch.Tensor:
    """mask_mod over batch rows 0..batch-1, heads 0..heads-1, query rows `rows` (a 1-D tensor) and keys
    0..kv_len-1: a bool (batch, heads, len(rows), kv_len) tensor."""
    idx = (lambda n: torch.arange(n, device=device))
    out = _vmapped(mask_mod, len(mod_args))(idx(batch), idx(heads), rows, idx(kv_len), *mod_args)
    if not isinstance(out, torch.Tensor) or out.shape != (batch, heads, len(rows), kv_len):
        raise TypeError(f"mask_mod(b, h, q_idx, kv_idx) must return a bool tensor of the indices' shape, got "
                        f"{type(out).__name__} {tuple(getattr(out, 'shape', ()))}")
    return out.bool()


def _table(classes: torch.Tensor, slots: torch.Tensor):
    """Per row of `classes` (..., R, C) (0 empty, 1 partial, 2 full): [n_lead, n_full, n_trail, visited columns in
    ascending order..., unused] as int32, and each entry's slot in the bits (-1: a full block). The n_full entries
    after the first n_lead are full blocks, run without mask arithmetic: the partial blocks before the first full
    one lead, those after the last trail -- a band's three segments. A row with a partial block between full ones
    lists everything as lead (masked: a full block there costs mask arithmetic, never a wrong result)."""
    C = classes.shape[-1]
    cols = torch.arange(C, device=classes.device)
    visited = classes > 0
    order = (torch.where(visited, 0, C) + cols).argsort(-1)  # visited columns ascending, then the rest
    full = classes == 2
    first = torch.where(full, cols, C).min(-1).values
    last = torch.where(full, cols, -1).max(-1).values
    n_full, n_visited = full.sum(-1), visited.sum(-1)
    lead = (visited & (cols < first[..., None])).sum(-1)
    trail = (visited & (cols > last[..., None])).sum(-1)
    clean = lead + n_full + trail == n_visited  # no partial block between full ones
    counts = torch.stack([torch.where(clean, lead, n_visited), torch.where(clean, n_full, 0),
                          torch.where(clean, trail, 0)], -1)
    pad = -(3 + C) % 16  # rows of a multiple of 16 entries: the row stride keeps the JIT's 16-divisibility class
    table = torch.nn.functional.pad(torch.cat([counts, order], -1), (0, pad)).to(torch.int32).contiguous()
    entry_slots = torch.where(full, -1, slots).gather(-1, order)
    slot = torch.nn.functional.pad(torch.cat([torch.zeros_like(counts), entry_slots], -1), (0, pad))
    return table, slot.to(torch.int32).contiguous()


@dataclass(frozen=True)
class BlockMask:
    """A mask of any shape in blocks of BLOCK_SIZE = (query rows, keys): which blocks each query block sees,
    partly (their pairs stored as bits) or wholly, per batch row and head -- or broadcast over them (batch / heads
    1). Made by `create_block_mask`; `flex_attention(..., block_mask=)` and the kernels take it.

    seq_lengths: (Q_LEN, KV_LEN); tables: the kernels' view (fused_attn.kernels.BlockTables) -- per query block
    [n_lead, n_full, n_trail, the key blocks it visits, ascending] (`_table`) and the transpose for the dK/dV
    kernel."""
    seq_lengths: Tuple[int, int]
    BLOCK_SIZE: Tuple[int, int]
    tables: BlockTables
    mask_mod: Callable

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        """(batch, heads, Q_LEN, KV_LEN); batch / heads 1 where the mask is the same for all."""
        return (*self.tables.kv.shape[:2], *self.seq_lengths)

    @property
    def ndim(self) -> int:
        """4, as the (batch, heads, Q_LEN, KV_LEN) masks it stands for (code that checks a mask's rank sees one)."""
        return 4

    def to_dense(self) -> torch.Tensor:
        """(B, H, n_q_blocks, n_kv_blocks) int32: 1 where the kernels visit the block (partly or wholly)."""
        table = self.tables.kv
        n = table[..., :3].sum(-1, keepdim=True)
        C = -(-self.seq_lengths[1] // self.BLOCK_SIZE[1])
        visited = torch.arange(C, device=table.device) < n
        dense = torch.zeros(*table.shape[:-1], C, dtype=torch.int32, device=table.device)
        return dense.scatter_(-1, table[..., 3:3 + C].long(), visited.to(torch.int32))

    def sparsity(self) -> float:
        """Percentage of blocks the kernels skip."""
        dense = self.to_dense()
        return 100.0 * (1.0 - dense.sum().item() / dense.numel())

    def __repr__(self) -> str:
        partial = (f"@triton.jit mask_mod={self.mask_mod.__name__}" if self.tables.mask_mod is not None
                   else f"partial blocks={self.tables.bits.shape[0]}")
        return (f"BlockMask(shape={self.shape}, BLOCK_SIZE={self.BLOCK_SIZE}, sparsity={self.sparsity():.2f}%, "
                f"{partial})")


def create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device=None, BLOCK_SIZE=128, *, mod_args=()) -> BlockMask:
    """A BlockMask from `mask_mod(b, h, q_idx, kv_idx) -> bool` (True: query q_idx of batch row b, head h attends to
    key kv_idx), PyTorch FlexAttention's signature and semantics; B / H None broadcast over batch rows / heads. The
    function is written for one pair of scalar index tensors and evaluated once, vectorized (torch.vmap), over every
    pair on `device` (default: CUDA if present, else the CPU), in chunks of query blocks (bounded memory); blocks
    it leaves all False are skipped by the kernels, all True run without mask arithmetic, the others keep their
    bits. `mod_args`: extra tensors passed to mask_mod after kv_idx.

    mask_mod may also be a `@triton.jit` function `mask_mod(b, h, q_idx, kv_idx, *mod_args)` over Triton tensors
    (broadcastable index blocks; mod_args: tensors -- pointers there --, ints, floats). It is evaluated in the
    kernels on the partial blocks instead of stored bits, and once here (a Triton kernel on `device`) to classify
    the blocks; the BlockMask keeps it and mod_args. Each new @triton.jit function compiles the kernels once; new
    lengths or mod_args values do not."""
    if not callable(mask_mod):
        raise TypeError(f"mask_mod must be a function (b, h, q_idx, kv_idx) -> bool, got {type(mask_mod).__name__}")
    sizes = []
    for name, n, none_ok in (("B", B, True), ("H", H, True), ("Q_LEN", Q_LEN, False), ("KV_LEN", KV_LEN, False)):
        if n is None and none_ok:
            n = 1
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive int{' or None' if none_ok else ''}, got {n!r}")
        sizes.append(n)
    B, H, Q_LEN, KV_LEN = sizes
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    if is_jit(mask_mod):
        return _classify_jit(mask_mod, tuple(mod_args), B, H, Q_LEN, KV_LEN, _block_size(BLOCK_SIZE), device)
    return _classify(lambda rows: evaluate(mask_mod, B, H, rows, KV_LEN, device, mod_args), B, H, Q_LEN, KV_LEN,
                     _block_size(BLOCK_SIZE), device, mask_mod)


def is_jit(fn) -> bool:
    """Whether fn is a @triton.jit function (compiled, or interpreted under TRITON_INTERPRET=1)."""
    return hasattr(fn, "fn") and hasattr(fn, "arg_names")


def _classify_jit(mask_mod, mod_args, B, H, Q_LEN, KV_LEN, block_size, device) -> BlockMask:
    """The BlockMask of a @triton.jit mask function: its blocks classified by counting its pairs on the device
    (kernels.count_visible); no bits (the kernels evaluate mask_mod on the partial blocks)."""
    check_device(device)
    mod_args = check_mod_args(mod_args, device, "a @triton.jit mask_mod")
    bq, bk = block_size
    counts = count_visible(mask_mod, mod_args, B, H, Q_LEN, KV_LEN, bq, bk, device)
    rows = (Q_LEN - torch.arange(counts.shape[2], device=device) * bq).clamp(max=bq)
    cols = (KV_LEN - torch.arange(counts.shape[3], device=device) * bk).clamp(max=bk)
    classes = torch.where(counts == rows[:, None] * cols[None, :], 2, (counts > 0).to(torch.int64))
    slots = torch.zeros(counts.shape, dtype=torch.int32, device=device)  # no bits: slot 0 is never read
    bits = torch.zeros(1, bq, bk, dtype=torch.uint8, device=device)
    return _block_mask(classes, slots, bits, (Q_LEN, KV_LEN), block_size, mask_mod, jit=True, mask_args=mod_args)


def _block_mask(classes, slots, bits, seq_lengths, block_size, mask_mod, jit=False, mask_args=()) -> BlockMask:
    """The BlockMask of per-block classes (0 empty, 1 partial, 2 full) and the partial blocks' slots in `bits`:
    the kernels' lists per query block and, transposed, per key block (_table). jit: mask_mod is a @triton.jit
    function (with mask_args) that the kernels evaluate instead of reading the bits."""
    kv, kv_slots = _table(classes, slots)
    q, q_slots = _table(classes.transpose(-1, -2), slots.transpose(-1, -2))
    tables = BlockTables(kv, kv_slots, q, q_slots, bits.contiguous(), *block_size, mask_mod if jit else None,
                         mask_args)
    return BlockMask(seq_lengths, block_size, tables, mask_mod)


def _classify(rows_mask, B, H, Q_LEN, KV_LEN, block_size, device, mask_mod=None) -> BlockMask:
    """The BlockMask of the element mask that rows_mask(rows) gives for query rows `rows` ((B, H, len(rows),
    KV_LEN) bool), computed in chunks of query blocks."""
    bq, bk = block_size
    nq, nk = -(-Q_LEN // bq), -(-KV_LEN // bk)
    classes = torch.zeros(B, H, nq, nk, dtype=torch.int8, device=device)
    slots = torch.zeros(B, H, nq, nk, dtype=torch.int32, device=device)
    bits = []
    per_chunk = max(1, CHUNK // (B * H * nk * bk * bq))  # query blocks per chunk
    n_slots = 0
    for q0 in range(0, nq, per_chunk):
        q1 = min(nq, q0 + per_chunk)
        rows = torch.arange(q0 * bq, min(q1 * bq, Q_LEN), device=device)
        m = rows_mask(rows)
        m = torch.nn.functional.pad(m, (0, nk * bk - KV_LEN, 0, (q1 - q0) * bq - len(rows)))  # outside: False
        m = m.view(B, H, q1 - q0, bq, nk, bk).transpose(3, 4)  # (B, H, q blocks, kv blocks, bq, bk)
        seen, whole = m.any((-1, -2)), m.all((-1, -2))
        cls = torch.where(whole, 2, torch.where(seen, 1, 0)).to(torch.int8)
        partial = cls == 1
        n = int(partial.sum())
        slots[:, :, q0:q1][partial] = torch.arange(n_slots, n_slots + n, dtype=torch.int32, device=device)
        classes[:, :, q0:q1] = cls
        bits.append(m[partial].to(torch.uint8))
        n_slots += n
    bits = torch.cat(bits + [torch.zeros(1 if n_slots == 0 else 0, bq, bk, dtype=torch.uint8, device=device)])
    return _block_mask(classes, slots, bits, (Q_LEN, KV_LEN), block_size, mask_mod)


def from_dense(mask: torch.Tensor, B: int, H: int, Q_LEN: int, KV_LEN: int, visible=None,
               BLOCK_SIZE=128) -> BlockMask:
    """The BlockMask of a boolean mask broadcastable to (B, H, Q_LEN, KV_LEN) (True: the pair takes part), AND
    visible(rows) ((len(rows), KV_LEN) bool, e.g. a band) where given; batch / heads stay 1 where the mask
    broadcasts over them."""
    while mask.dim() < 4:
        mask = mask[None]
    Bm, Hm = (1 if mask.shape[0] == 1 else B), (1 if mask.shape[1] == 1 else H)
    mask = mask.expand(Bm, Hm, Q_LEN, KV_LEN)

    def rows_mask(rows):
        m = mask[:, :, rows]
        return m if visible is None else m & visible(rows)
    return _classify(rows_mask, Bm, Hm, Q_LEN, KV_LEN, _block_size(BLOCK_SIZE), mask.device)


def as_block_mask(block_mask) -> BlockMask:
    """A fused_attn BlockMask as it is; one made by torch.nn.attention.flex_attention.create_block_mask converted
    once (its mask_mod evaluated into ours, with its block size, batch and heads)."""
    if isinstance(block_mask, BlockMask):
        return block_mask
    try:
        from torch.nn.attention.flex_attention import BlockMask as TorchBlockMask
    except ImportError:
        TorchBlockMask = ()
    if isinstance(block_mask, TorchBlockMask):
        B, H = block_mask.kv_num_blocks.shape[:2]
        return create_block_mask(block_mask.mask_mod, B, H, *block_mask.seq_lengths,
                                 device=block_mask.kv_num_blocks.device, BLOCK_SIZE=tuple(block_mask.BLOCK_SIZE))
    raise TypeError(f"block_mask must be a fused_attn.BlockMask (create_block_mask) or PyTorch FlexAttention's, got "
                    f"{type(block_mask).__name__}")


def _python_masks(mask_mods):
    if not mask_mods:
        raise ValueError("and_masks / or_masks need at least one mask function")
    for m in mask_mods:
        if is_jit(m) or not callable(m):
            raise TypeError(f"and_masks / or_masks combine Python mask functions; got {m!r} (combine @triton.jit mask "
                            f"functions in one @triton.jit function)")


def and_masks(*mask_mods):
    """The mask function true where every one of mask_mods (Python mask functions) is."""
    _python_masks(mask_mods)
    def mask(b, h, q_idx, kv_idx):
        out = mask_mods[0](b, h, q_idx, kv_idx)
        for m in mask_mods[1:]:
            out = out & m(b, h, q_idx, kv_idx)
        return out
    return mask


def or_masks(*mask_mods):
    """The mask function true where any of mask_mods (Python mask functions) is."""
    _python_masks(mask_mods)
    def mask(b, h, q_idx, kv_idx):
        out = mask_mods[0](b, h, q_idx, kv_idx)
        for m in mask_mods[1:]:
            out = out | m(b, h, q_idx, kv_idx)
        return out
    return mask
