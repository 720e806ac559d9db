"""Masks of any shape, FlexAttention's model: a mask function evaluated once into a BlockMask -- per (batch, head,
query block) the key blocks it sees, split into partial blocks (their element mask stored) and full ones -- that the
kernels walk instead of a contiguous range. The mask data are runtime values: a new mask never recompiles."""
import dataclasses
import weakref
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
    if out.dtype != torch.bool:  # as PyTorch's: a float "mask" is a score_mod's job (or attn_mask's bias)
        raise TypeError(f"mask_mod(b, h, q_idx, kv_idx) must return a bool tensor, got dtype {out.dtype} (compare "
                        f"it, e.g. `!= 0`; an additive bias goes in score_mod or attn_mask)")
    return out


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

    def _lists(self, full: bool):
        """PyTorch's lists from ours: (num_blocks (B, H, nq), indices (B, H, nq, n_kv_blocks)) int32 of the partial
        blocks (full=False: the entries before and after a row's full segment) or of the full ones."""
        table, C = self.tables.kv, -(-self.seq_lengths[1] // self.BLOCK_SIZE[1])
        lead, n_full, trail = table[..., 0:1], table[..., 1:2], table[..., 2:3]
        pos = torch.arange(C, device=table.device)
        in_full = (pos >= lead) & (pos < lead + n_full)
        chosen = in_full if full else (pos < lead + n_full + trail) & ~in_full
        order = torch.where(chosen, 0, 1).argsort(dim=-1, stable=True)  # chosen entries first, in their order
        return chosen.sum(-1).to(torch.int32), table[..., 3:3 + C].gather(-1, order).to(torch.int32)

    @property
    def kv_num_blocks(self) -> torch.Tensor:
        """(B, H, n_q_blocks) int32: per query block, how many partial key blocks it visits (PyTorch's field)."""
        return self._lists(full=False)[0]

    @property
    def kv_indices(self) -> torch.Tensor:
        """(B, H, n_q_blocks, n_kv_blocks) int32: the partial key blocks first (kv_num_blocks of them), ascending."""
        return self._lists(full=False)[1]

    @property
    def full_kv_num_blocks(self) -> torch.Tensor:
        """(B, H, n_q_blocks) int32: per query block, how many key blocks it sees wholly."""
        return self._lists(full=True)[0]

    @property
    def full_kv_indices(self) -> torch.Tensor:
        """(B, H, n_q_blocks, n_kv_blocks) int32: the full key blocks first (full_kv_num_blocks of them)."""
        return self._lists(full=True)[1]

    @classmethod
    def from_kv_blocks(cls, kv_num_blocks, kv_indices, full_kv_num_blocks=None, full_kv_indices=None,
                       BLOCK_SIZE=128, mask_mod=None, seq_lengths=None) -> "BlockMask":
        """PyTorch's BlockMask.from_kv_blocks: the mask of given block lists -- per (batch, head, query block) the
        partial key blocks (kv_num_blocks, kv_indices; mask_mod, default none, applies inside them) and the full
        ones -- nothing outside them. seq_lengths default: the lists' blocks times BLOCK_SIZE."""
        bq, bk = _block_size(BLOCK_SIZE)
        for name, t, dims in (("kv_num_blocks", kv_num_blocks, 3), ("kv_indices", kv_indices, 4),
                              ("full_kv_num_blocks", full_kv_num_blocks, 3), ("full_kv_indices", full_kv_indices, 4)):
            if t is not None and (not isinstance(t, torch.Tensor) or t.dim() != dims or t.is_floating_point()):
                raise TypeError(f"{name} must be an integer tensor of {dims} dims, got {getattr(t, 'dtype', t)} "
                                f"{tuple(getattr(t, 'shape', ()))}")
        if mask_mod is not None and is_jit(mask_mod):
            raise TypeError("from_kv_blocks takes a Python mask_mod (evaluated into the blocks' bits); a @triton.jit "
                            "one goes to create_block_mask")
        if (full_kv_num_blocks is None) != (full_kv_indices is None):
            raise ValueError("full_kv_num_blocks and full_kv_indices go together")
        if seq_lengths is None:
            seq_lengths = (kv_indices.shape[2] * bq, kv_indices.shape[3] * bk)
        return _from_lists(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, (bq, bk), mask_mod,
                           tuple(seq_lengths))

    def __getitem__(self, index) -> "BlockMask":
        """The mask of some batch rows and heads: index = b or (b, h), each an int or a slice (an int keeps its
        dimension, as PyTorch's does); a dimension the mask broadcasts over (size 1) stays broadcast. The rows keep
        their own mask (their bits are shared, not copied)."""
        if self.tables.mask_mod is not None:
            raise NotImplementedError("indexing a BlockMask of a @triton.jit mask_mod: the kernels would evaluate it "
                                      "at the new batch / head indices; build the mask for the rows you need")
        index = index if isinstance(index, tuple) else (index,)
        if len(index) > 2:
            raise NotImplementedError("a BlockMask is indexed by batch and head (query blocks are not sliced)")
        picks = []
        for i, n in zip((*index, slice(None))[:2], self.tables.kv.shape[:2]):
            if isinstance(i, bool) or not isinstance(i, (int, slice)):
                raise TypeError(f"BlockMask indices are ints or slices, got {i!r}")
            if n == 1:
                picks.append(slice(None))
            elif isinstance(i, int):
                if not -n <= i < n:
                    raise IndexError(f"index {i} is out of range for size {n}")
                picks.append(slice(i % n, i % n + 1))
            else:
                picks.append(i)
        cut = (lambda t: t[tuple(picks)].contiguous())
        t = self.tables
        tables = dataclasses.replace(t, kv=cut(t.kv), kv_slots=cut(t.kv_slots), q=cut(t.q), q_slots=cut(t.q_slots))
        return BlockMask(self.seq_lengths, self.BLOCK_SIZE, tables, self.mask_mod)

    def to(self, device) -> "BlockMask":
        """The mask on another device (its tables and bits copied; a @triton.jit mask_mod's tensor arguments too)."""
        move = (lambda x: x.to(device) if isinstance(x, torch.Tensor) else x)
        t = self.tables
        tables = dataclasses.replace(t, kv=move(t.kv), kv_slots=move(t.kv_slots), q=move(t.q), q_slots=move(t.q_slots),
                                     bits=move(t.bits), mask_args=tuple(map(move, t.mask_args)))
        return BlockMask(self.seq_lengths, self.BLOCK_SIZE, tables, self.mask_mod)

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


def _classify(rows_mask, B, H, Q_LEN, KV_LEN, block_size, device, mask_mod=None, compact=True) -> BlockMask:
    """The BlockMask of the element mask that rows_mask(rows) gives for query rows `rows` ((B, H, len(rows),
    KV_LEN) bool), computed in chunks of query blocks. compact: only the partial blocks' bits are kept, which
    counts them on the host (a device sync per chunk: for masks made once); else every block's bits are kept at its
    own slot -- fixed-size tables, no value read on the host (masks given per call: attn_mask)."""
    bq, bk = block_size
    nq, nk = -(-Q_LEN // bq), -(-KV_LEN // bk)
    classes = torch.zeros(B, H, nq, nk, dtype=torch.int8, device=device)
    if compact:
        slots = torch.zeros(B, H, nq, nk, dtype=torch.int32, device=device)
    else:
        slots = torch.arange(B * H * nq * nk, dtype=torch.int32, device=device).view(B, H, nq, nk)
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
        classes[:, :, q0:q1] = cls
        if not compact:
            bits.append(m.to(torch.uint8))
            continue
        partial = cls == 1
        n = int(partial.sum())
        slots[:, :, q0:q1][partial] = torch.arange(n_slots, n_slots + n, dtype=torch.int32, device=device)
        bits.append(m[partial].to(torch.uint8))
        n_slots += n
    if not compact:  # (B, H, nq, nk, bq, bk): slot = the block's index
        return _block_mask(classes, slots, torch.cat(bits, 2).reshape(-1, bq, bk), (Q_LEN, KV_LEN), block_size,
                           mask_mod)
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
    return _classify(rows_mask, Bm, Hm, Q_LEN, KV_LEN, _block_size(BLOCK_SIZE), mask.device, compact=False)


def _listed(num_blocks, indices, n_cols: int) -> torch.Tensor:
    """PyTorch's block lists (num_blocks (B, H, nq), indices (B, H, nq, n)) as (B, H, nq, n_cols) bool: the blocks
    listed."""
    valid = torch.arange(indices.shape[-1], device=indices.device) < num_blocks[..., None]
    cols = torch.where(valid & (indices < n_cols), indices.long(), n_cols)  # the rest lands in a column dropped
    out = torch.zeros(*indices.shape[:-1], n_cols + 1, dtype=torch.bool, device=indices.device)
    return out.scatter_(-1, cols, True)[..., :n_cols]


def _from_lists(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, block_size, mask_mod,
                seq_lengths) -> BlockMask:
    """The mask PyTorch's block lists stand for: the pairs of the blocks in kv_indices where mask_mod (None: every
    pair) lets them take part, every pair of those in full_kv_indices, nothing else."""
    bq, bk = block_size
    Q_LEN, KV_LEN = seq_lengths
    B, H = kv_num_blocks.shape[:2]
    device = kv_num_blocks.device
    nk = -(-KV_LEN // bk)
    partial = _listed(kv_num_blocks, kv_indices, nk)
    full = torch.zeros_like(partial) if full_kv_num_blocks is None else _listed(full_kv_num_blocks, full_kv_indices, nk)
    col_blocks = torch.arange(KV_LEN, device=device) // bk

    def rows_mask(rows):
        blocks = (lambda t: t[:, :, rows // bq][..., col_blocks])  # (B, H, len(rows), KV_LEN)
        inside = blocks(partial)
        if mask_mod is not None:
            inside = inside & evaluate(mask_mod, B, H, rows, KV_LEN, device)
        return inside | blocks(full)
    return _classify(rows_mask, B, H, Q_LEN, KV_LEN, block_size, device, mask_mod)


def _from_torch(bm) -> BlockMask:
    """A PyTorch BlockMask with its semantics (_from_lists), whether its lists came from create_block_mask or were
    given (BlockMask.from_kv_blocks). Batch, heads and block size stay."""
    return _from_lists(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
                       _block_size(tuple(bm.BLOCK_SIZE)), bm.mask_mod, tuple(bm.seq_lengths))


# PyTorch BlockMasks converted, by the object: a mask made once and passed to every layer is converted once. The
# entry lives as long as the PyTorch BlockMask does (weak keys: it is freed with it). BlockMasks are immutable.
_converted = weakref.WeakKeyDictionary()


def as_block_mask(block_mask) -> BlockMask:
    """A fused_attn BlockMask as it is; one made by PyTorch (torch.nn.attention.flex_attention's create_block_mask
    or BlockMask.from_kv_blocks) converted on first use (_from_torch) and cached with the object."""
    if isinstance(block_mask, BlockMask):
        return block_mask
    try:
        from torch.nn.attention.flex_attention import BlockMask as TorchBlockMask
    except ImportError:
        TorchBlockMask = ()
    if isinstance(block_mask, TorchBlockMask):
        converted = _converted.get(block_mask)
        if converted is None:
            converted = _converted[block_mask] = _from_torch(block_mask)
        return converted
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
