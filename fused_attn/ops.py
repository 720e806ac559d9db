"""The Triton launchers as torch.library custom ops, so torch.compile(fullgraph=True) traces through
fused_attn (the compiler sees opaque ops with fake implementations, not Triton launches).

The one place where the call's bundles (`Call`: the mask, Modifiers, Packed) become the flat schema torch.library
needs: `attention_forward` / `attention_backward` / `attention_decode` take bundles, the custom ops below take
their fields, by one table (CALL_FIELDS). In eager mode the calls launch the kernels directly (the ops' dispatch
costs more host time than the rest of a decode call); the ops are torch.compile's path, with the same bits.

Dense batches pass no cu_seqlens. Packed sequences (attention_varlen) pass (1, H, total, D) views and
cu_seqlens_q / cu_seqlens_k with the max lengths; rows past the last sequence are read by no kernel, so their
buffers start as out 0, lse -inf and gradients 0."""
import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import batch_invariant, kernels
from .kernels import BlockTables, Modifiers, Packed
from .kernels.decode import launches_rows
from .kernels.launch import fresh


@dataclass(frozen=True)
class Call:
    """What one attention call takes beside q, k, v: the softmax scale, the mask (query row i sees key column j iff
    i + offset - left <= j <= i + offset + right, -1 unbounded), the output layout, the modifiers, for packed
    sequences their offsets, and a block mask's tables (walked instead of the band)."""
    scale: float
    offset: int
    left: int
    right: int
    layout: str = "bhsd"
    mods: Modifiers = Modifiers()
    packed: Optional[Packed] = None
    blocks: Optional[BlockTables] = None
    out_dtype: Optional[torch.dtype] = None  # FP8 inputs: the output's dtype (else the inputs')
    split_keys: int = 0  # the batch-invariant mode's keys per split (fused_attn/batch_invariant.py); 0: off

    def tensors(self) -> list:
        """Every tensor the call holds (modifiers, score / mask function arguments, packed offsets, block tables):
        what a backward reads besides q, k, v, out."""
        found = []
        for bundle in (self.mods, self.packed, self.blocks):
            for x in vars(bundle).values() if bundle is not None else ():
                if isinstance(x, Tensor):
                    found.append(x)
                elif isinstance(x, tuple):
                    found += [t for t in x if isinstance(t, Tensor)]
        return found

    @classmethod
    def of(cls, a, mods: Modifiers = Modifiers(), packed: Optional[Packed] = None,
           blocks: Optional[BlockTables] = None, out_dtype: Optional[torch.dtype] = None) -> "Call":
        """The Call of checked Args `a` (fused_attn._args.Args), in the batch-invariant mode if it is on."""
        return cls(a.scale, a.offset, a.left, a.right, a.layout, mods, packed, blocks, out_dtype,
                   batch_invariant.split_keys())


REQUIRED = object()  # a field every call gives

# The Call as the custom ops carry it beside their tensors: one row per field -- (flat name, schema type, default,
# bundle, attribute). The ops' schemas, their fake implementations and the Call <-> flat conversion all come from
# this table: a new field of a bundle the ops must carry is one more row.
CALL_FIELDS = (
    ("scale", "float", REQUIRED, None, "scale"),
    ("offset", "int", REQUIRED, None, "offset"),
    ("left", "int", REQUIRED, None, "left"),
    ("right", "int", REQUIRED, None, "right"),
    ("cu_seqlens_q", "Tensor?", None, "packed", "cu_seqlens_q"),
    ("cu_seqlens_k", "Tensor?", None, "packed", "cu_seqlens_k"),
    ("max_seqlen_q", "int", 0, "packed", "max_seqlen_q"),
    ("max_seqlen_k", "int", 0, "packed", "max_seqlen_k"),
    ("softcap", "float", 0.0, "mods", "softcap"),
    ("alibi_slopes", "Tensor?", None, "mods", "alibi_slopes"),
    ("dropout_p", "float", 0.0, "mods", "dropout_p"),
    ("mask_kv", "Tensor?", None, "blocks", "kv"),
    ("mask_kv_slots", "Tensor?", None, "blocks", "kv_slots"),
    ("mask_q", "Tensor?", None, "blocks", "q"),
    ("mask_q_slots", "Tensor?", None, "blocks", "q_slots"),
    ("mask_bits", "Tensor?", None, "blocks", "bits"),
    ("mask_block_q", "int", 1, "blocks", "block_q"),
    ("mask_block_k", "int", 1, "blocks", "block_k"),
    ("bias", "Tensor?", None, "mods", "bias"),
    ("sinks", "Tensor?", None, "mods", "sinks"),
    ("split_keys", "int", 0, None, "split_keys"),
)
# Present exactly when the call has the bundle (its first row's attribute is never None then).
_PRESENT = {"packed": "cu_seqlens_q", "blocks": "kv"}


def _flat(c: Call) -> tuple:
    """The Call's fields in CALL_FIELDS order (a bundle the call lacks gives its rows' defaults)."""
    return tuple((getattr(c, attr) if bundle is None else default if getattr(c, bundle) is None
                  else getattr(getattr(c, bundle), attr)) for _, _, default, bundle, attr in CALL_FIELDS)


def _unflat(values, layout: str = "bhsd", rng=None) -> Call:
    """The Call of _flat's values (rng: a dropout call's [seed, offset] joins the Modifiers)."""
    groups = {None: {}, "packed": {}, "mods": {}, "blocks": {}}
    for (_, _, _, bundle, attr), value in zip(CALL_FIELDS, values):
        groups[bundle][attr] = value
    packed, blocks = (groups[b] if groups[b][_PRESENT[b]] is not None else None for b in ("packed", "blocks"))
    return Call(**groups[None], layout=layout, mods=Modifiers(**groups["mods"], rng=rng),
                packed=packed and Packed(**packed), blocks=blocks and BlockTables(**blocks))


def _bind(fields: tuple, kwargs: dict, extra) -> list:
    """An op's arguments after its leading tensors, as its implementation receives them (positionally, trailing
    defaults left out; by name where given so), completed: CALL_FIELDS' values, then its own rows' (extra)."""
    rows = CALL_FIELDS + tuple(extra)
    values = list(fields) + [kwargs.get(row[0], row[2]) for row in rows[len(fields):]]
    assert not any(v is REQUIRED for v in values), values  # the schema makes the op refuse such a call first
    return values


def _schema(tensors: str, extra, returns: str) -> str:
    """An op's schema: its leading tensors, CALL_FIELDS, then its own (name, type, default) rows."""
    rows = [f"{t} {name}" + ("" if d is REQUIRED else f"={d!r}" if not isinstance(d, str) else f'="{d}"')
            for name, t, d, *_ in CALL_FIELDS + tuple(extra)]
    return f"({tensors}, {', '.join(rows)}) -> {returns}"


def _opaque(c: Call) -> bool:
    """Whether the call launches the kernels directly instead of through the custom ops: always in eager mode (an
    op's dispatch costs ~30 us on the host, more than the rest of a decode call), and under torch.compile for what
    the ops' schema cannot carry -- @triton.jit score or mask functions (and their argument tuples), FP8 inputs'
    descales (torch.compile breaks its graph there)."""
    return (not torch.compiler.is_compiling() or c.mods.score_mod is not None
            or (c.blocks is not None and c.blocks.mask_mod is not None) or c.mods.q_descale is not None)


def attention_forward(q, k, v, c: Call):
    """(out, lse, stats, rng) of `forward` for (B, H, S, D)-indexed q, k, v."""
    if _opaque(c):
        return _forward(q, k, v, c)
    return forward(q, k, v, *_flat(c), c.layout)


def attention_backward(dout, q, k, v, out, stats, rng, c: Call, bias_grad: bool = False, dlse=None):
    """(dq, dk, dv, dbias, dsinks) of `backward`: rng is the forward's [seed, offset]; dbias (B, Hq, Sq, Sk) float32,
    the gradient of the bias before any broadcast sum, where bias_grad asks for it, else an empty tensor; dsinks
    (Hq,) float32 with sinks, else empty; dlse: the gradient of the lse (B, Hq, Sq), or None where it has none."""
    if dlse is not None:
        dlse = dlse.float().contiguous()
    if _opaque(c):
        return _backward(dout, q, k, v, out, stats, rng, c, bias_grad, dlse)
    return backward(dout, q, k, v, out, stats, *_flat(c), rng, bias_grad, dlse)


def attention_decode(q, k, v, c: Call, seqlens_k=None, block_table=None, page_size: int = 0, num_splits: int = 0,
                     plan=None):
    """(out, lse) of `decode` (split-KV) against k, v: (B, Hkv, S, D)-indexed caches, or paged (pages, Hkv,
    page_size, D)-indexed with block_table; seqlens_k: keys per row (None: all S, or c.packed's cu_seqlens_k).
    Packed (c.packed): (1, H, total, D) views of q (and of k, v unless paged). plan: a step's
    kernels.DecodePlan (get_scheduler_metadata), used in eager mode (under torch.compile the op plans)."""
    if c.mods.dropout_p or c.blocks is not None or c.mods.bias is not None or c.mods.score_mod is not None:
        raise ValueError("the split-KV kernels take neither dropout, block masks, biases nor score functions")
    if not torch.compiler.is_compiling():
        return _decode(q, k, v, c, seqlens_k, block_table, page_size, num_splits, plan)
    return decode(q, k, v, *_flat(c), seqlens_k, block_table, page_size, num_splits, c.layout, c.mods.k_descale,
                  c.mods.v_descale)


def draw_rng(device) -> Tensor:
    """A dropout call's int64 [seed, offset] on `device`, drawn from torch's default generator of that device (so
    each call advances it, and torch.manual_seed / set_rng_state reproduce a call); seed in [0, 2^63), offset in
    [0, 2^31). No host synchronization: the kernels read it from the device."""
    seed = torch.randint(0, 2 ** 63 - 1, (1,), device=device, dtype=torch.int64)
    return torch.cat([seed, torch.randint(0, 2 ** 31, (1,), device=device, dtype=torch.int64)])


def _out_lse(q, v, layout, packed: bool = False, dtype=None):
    """out (in q's dtype, or `dtype`) and the float32 lse. out is laid out as `layout` for packed sequences, where
    it starts as 0 (lse -inf) on rows no kernel writes; otherwise in q's memory order (its batch, head and sequence
    dims ordered by q's strides, as PyTorch's attention keeps the query's stride order; head dim innermost)."""
    B, Hq, Sq, _ = q.shape
    shape = (B, Hq, Sq, v.shape[-1])
    if packed:
        order = (0, 2, 1, 3) if layout == "bshd" else (0, 1, 2, 3)
        out = fresh(q.new_zeros([shape[d] for d in order], dtype=dtype), 0.0).permute(*order)
        return out, fresh(q.new_full((B, Hq, Sq), float("-inf"), dtype=torch.float32), float("-inf"))
    order = (*sorted(range(3), key=lambda d: -q.stride(d)), 3)  # stable: ties keep (B, H, S)
    out = torch.empty_permuted(shape, order, dtype=dtype or q.dtype, device=q.device)
    return fresh(out), fresh(q.new_empty(B, Hq, Sq, dtype=torch.float32))


def _forward_buffers(q, v, layout, packed: bool, dtype=None):
    new = q.new_zeros if packed else q.new_empty
    # packed: defined on rows no kernel writes, like every output
    stats = fresh(new(*q.shape[:3], 2, dtype=torch.float32), 0.0 if packed else None)
    return (*_out_lse(q, v, layout, packed, dtype), stats)


def _rng_buffer(q, dropout_p):
    """The [seed, offset] of a dropout call; an empty tensor without dropout."""
    return q.new_empty(2 if dropout_p > 0 else 0, dtype=torch.int64)


def _forward(q, k, v, c: Call):
    out, lse, stats = _forward_buffers(q, v, c.layout, c.packed is not None, c.out_dtype)
    rng = draw_rng(q.device) if c.mods.dropout_p > 0 else _rng_buffer(q, 0.0)
    kernels.attention_forward(q, k, v, out, lse, stats, scale=c.scale, offset=c.offset, left=c.left, right=c.right,
                              packed=c.packed, mods=dataclasses.replace(c.mods, rng=rng), blocks=c.blocks,
                              split_keys=c.split_keys)
    return out, lse, stats, rng


_FORWARD_EXTRA = [("layout", "str", "bhsd")]


def _forward_op(q, k, v, *fields, **kwargs):
    """The op fused_attn::forward: (B, H, S, D)-indexed q, k, v and the Call's fields (CALL_FIELDS, then layout) ->
    out (laid out as `layout`), lse, stats (kernels.attention_forward) and the dropout call's [seed, offset]
    (draw_rng; empty without dropout), which the backward takes back."""
    *values, layout = _bind(fields, kwargs, _FORWARD_EXTRA)
    return _forward(q, k, v, _unflat(values, layout))


forward = torch.library.custom_op("fused_attn::forward", _forward_op, mutates_args=(), schema=_schema(
    "Tensor q, Tensor k, Tensor v", _FORWARD_EXTRA, "(Tensor, Tensor, Tensor, Tensor)"))


@forward.register_fake
def _(q, k, v, *fields, **kwargs):
    *values, layout = _bind(fields, kwargs, _FORWARD_EXTRA)
    c = _unflat(values, layout)
    return (*_forward_buffers(q, v, layout, c.packed is not None), _rng_buffer(q, c.mods.dropout_p))


def _grad_buffers(q, k, v, packed: bool, dbias_shape, sinks: bool):
    new = torch.zeros_like if packed else torch.empty_like
    return (new(q), new(k), new(v), q.new_zeros(dbias_shape, dtype=torch.float32),
            q.new_zeros(q.shape[1] if sinks else 0, dtype=torch.float32))


def _backward(dout, q, k, v, out, stats, rng, c: Call, bias_grad: bool, dlse=None):
    sinks = c.mods.sinks is not None
    dq, dk, dv, dbias, dsinks = _grad_buffers(q, k, v, c.packed is not None, _dbias_shape(q, k, bias_grad), sinks)
    delta = torch.empty(stats.shape[:-1], device=q.device, dtype=torch.float32)
    dsink_rows = torch.zeros(stats.shape[:-1], device=q.device, dtype=torch.float32) if sinks else None
    kernels.attention_backward(dout, q, k, v, out, stats, dq, dk, dv, delta, scale=c.scale, offset=c.offset,
                               left=c.left, right=c.right, packed=c.packed,
                               mods=dataclasses.replace(c.mods, rng=rng), blocks=c.blocks,
                               dbias=dbias if bias_grad else None, dsink=dsink_rows, dlse=dlse)
    if sinks:  # each row's term, summed per head in a fixed order (no atomics)
        dsinks = dsink_rows.sum((0, 2))
    return dq, dk, dv, dbias, dsinks


def _dbias_shape(q, k, bias_grad: bool):
    """dS of every (b, h, i, j) where a bias needs its gradient (the kernels write each once: no atomics), else
    nothing."""
    return (*q.shape[:3], k.shape[2]) if bias_grad else (0,)


_BACKWARD_EXTRA = [("rng", "Tensor?", None), ("bias_grad", "bool", False), ("dlse", "Tensor?", None)]


def _backward_op(dout, q, k, v, out, stats, *fields, **kwargs):
    """The op fused_attn::backward: the Call's fields (CALL_FIELDS), then rng (the forward's [seed, offset]),
    bias_grad and dlse (the lse's gradient, float32 contiguous, or None) -> dq, dk, dv (kernels.attention_backward),
    dbias and dsinks (attention_backward)."""
    *values, rng, bias_grad, dlse = _bind(fields, kwargs, _BACKWARD_EXTRA)
    return _backward(dout, q, k, v, out, stats, rng, _unflat(values), bias_grad, dlse)


backward = torch.library.custom_op("fused_attn::backward", _backward_op, mutates_args=(), schema=_schema(
    "Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor stats", _BACKWARD_EXTRA,
    "(Tensor, Tensor, Tensor, Tensor, Tensor)"))


@backward.register_fake
def _(dout, q, k, v, out, stats, *fields, **kwargs):
    *values, rng, bias_grad, dlse = _bind(fields, kwargs, _BACKWARD_EXTRA)
    c = _unflat(values)
    return _grad_buffers(q, k, v, c.packed is not None, _dbias_shape(q, k, bias_grad), c.mods.sinks is not None)


def _decode(q, k, v, c: Call, seqlens_k, block_table, page_size: int, num_splits: int, plan=None):
    """Split-KV attention (kernels.attention_decode): (B, Hq, Sq, D)-indexed q -> out (laid out as c.layout), lse.
    k, v: (B, Hkv, S, D)-indexed contiguous caches, or (pages, Hkv, page_size, D) with block_table. Packed
    sequences (c.packed): B = 1, out 0 and lse -inf on rows no sequence covers. FP8 k, v: c.mods' k_descale /
    v_descale (B, Hkv) float32; out in q's dtype. c.split_keys > 0: the batch-invariant mode's splits."""
    p = c.packed
    max_seqlen_k = p.max_seqlen_k if p is not None else (
        k.shape[2] if block_table is None else block_table.shape[1] * page_size)
    # Packed: rows no sequence covers are 0 / -inf, written by the kernels where they launch.
    filled = p is not None and not launches_rows(p.cu_seqlens_q.shape[0] - 1, p.max_seqlen_q, q.shape[2])
    out, lse = _out_lse(q, v, c.layout, filled)
    kernels.attention_decode(q, k, v, out, lse, seqlens_k, block_table, page_size=page_size,
                             max_seqlen_k=max_seqlen_k, scale=c.scale, left=c.left, right=c.right,
                             num_splits=num_splits, mods=c.mods, packed=p, plan=plan, split_keys=c.split_keys)
    return out, lse


# The decode op's own rows after CALL_FIELDS: the cache's lengths and pages, the split count, the output's layout
# and an FP8 cache's descales.
_DECODE_EXTRA = [("seqlens_k", "Tensor?", None), ("block_table", "Tensor?", None), ("page_size", "int", 0),
                 ("num_splits", "int", 0), ("layout", "str", "bhsd"), ("k_descale", "Tensor?", None),
                 ("v_descale", "Tensor?", None)]


def _decode_op(q, k, v, *fields, **kwargs):
    """The op fused_attn::decode (torch.compile's path): q, k, v, the Call's fields (CALL_FIELDS), then
    _DECODE_EXTRA -> out, lse (_decode)."""
    *values, seqlens_k, block_table, page_size, num_splits, layout, k_descale, v_descale = _bind(
        fields, kwargs, _DECODE_EXTRA)
    c = _unflat(values, layout)
    c = dataclasses.replace(c, mods=dataclasses.replace(c.mods, k_descale=k_descale, v_descale=v_descale))
    return _decode(q, k, v, c, seqlens_k, block_table, page_size, num_splits)


decode = torch.library.custom_op("fused_attn::decode", _decode_op, mutates_args=(), schema=_schema(
    "Tensor q, Tensor k, Tensor v", _DECODE_EXTRA, "(Tensor, Tensor)"))


@decode.register_fake
def _(q, k, v, *fields, **kwargs):
    *values, layout, _, _ = _bind(fields, kwargs, _DECODE_EXTRA)
    return _out_lse(q, v, layout, _unflat(values[:len(CALL_FIELDS)]).packed is not None)


def write_kv(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
    """k_cache / v_cache (pages, page_size, Hkv, D) written in place at slot_mapping: the kernel directly in eager
    mode, the custom op under torch.compile."""
    (write_kv_cache if torch.compiler.is_compiling() else kernels.write_kv)(key, value, k_cache, v_cache,
                                                                            slot_mapping, k_scale, v_scale)


@torch.library.custom_op("fused_attn::write_kv_cache", mutates_args=("k_cache", "v_cache"))
def write_kv_cache(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
                   k_scale: Optional[Tensor] = None, v_scale: Optional[Tensor] = None) -> None:
    """k_cache / v_cache (pages, page_size, Hkv, D) written in place at slot_mapping (kernels.write_kv)."""
    kernels.write_kv(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)


@write_kv_cache.register_fake
def _(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
    return None
