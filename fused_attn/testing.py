"""The numerics cases and their harness, shared by the test suite and `python -m fused_attn check`: a case's inputs,
one run of the kernels (with the dropout mask it drew), and its measurement against the float64 reference under the
rule of fused_attn/numerics.py."""
import contextlib
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import kernels, reference
from .decode import attention_with_kvcache
from .function import attention, with_keep_mask
from .numerics import FACTORS, Metric, delta_noise, fp8_p_floor
from .varlen import attention_varlen, cu_seqlens

DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass(frozen=True)
class Case:
    batch: int
    heads_q: int
    heads_kv: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    head_dim_v: int = None  # None: same as head_dim
    dtype: torch.dtype = torch.float16
    causal: bool = False
    window: tuple = (-1, -1)
    layout: str = "bhsd"
    strided: bool = False  # non-contiguous inputs (every other element of the head dim)
    logit_scale: float = 1.0  # multiplies q: large values give large logits
    scale: float = None  # softmax scale; None: 1 / sqrt(head_dim)
    softcap: float = 0.0
    alibi: str = None  # None, "head": slopes (Hq,), "batch": slopes (B, Hq) (alibi_slopes)
    dropout: float = 0.0

    @property
    def dv(self):
        return self.head_dim if self.head_dim_v is None else self.head_dim_v

    @property
    def mask(self) -> str:
        parts = ["causal"] if self.causal else []
        if self.window != (-1, -1):
            parts.append(f"win{self.window[0]},{self.window[1]}")
        return "+".join(parts) or "none"

    @property
    def name(self) -> str:
        s = (f"b{self.batch}h{self.heads_q}/{self.heads_kv}-q{self.seqlen_q}k{self.seqlen_k}-"
             f"d{self.head_dim}" + (f"v{self.dv}" if self.dv != self.head_dim else "") +
             f"-{DTYPE_NAMES[self.dtype]}-{self.mask}-{self.layout}")
        s += ("-strided" if self.strided else "") + (f"-x{self.logit_scale:g}" if self.logit_scale != 1 else "")
        return s + (f"-scale{self.scale:g}" if self.scale is not None else "") + modifier_name(self)


def modifier_name(case) -> str:
    return ((f"-cap{case.softcap:g}" if case.softcap else "") + (f"-alibi-{case.alibi}" if case.alibi else "") +
            (f"-drop{case.dropout:g}" if case.dropout else ""))


def alibi_slopes(heads: int, batch: int = 0, device=None) -> torch.Tensor:
    """reference.alibi_slopes (heads,); with batch > 0, (batch, heads) with row b scaled by b + 1 (slopes that differ
    per batch row)."""
    s = reference.alibi_slopes(heads, device)
    return s[None] * torch.arange(1, batch + 1, device=device, dtype=torch.float32)[:, None] if batch else s


def kernel_modifiers(case, batch: int, device) -> dict:
    """The case's softcap / alibi_slopes / dropout_p keyword arguments for the kernels' entry points."""
    slopes = None if not case.alibi else alibi_slopes(case.heads_q, batch if case.alibi == "batch" else 0, device)
    return dict(softcap=case.softcap, alibi_slopes=slopes, dropout_p=case.dropout)


def run_with_mask(fn, mods: dict, device, shape):
    """fn() (a kernel call with the dropout of `mods`), and the keep-mask of `shape` it used (None without dropout):
    the generator state before the call, restored, gives fused_attn.dropout_mask the same draw."""
    return with_keep_mask(fn, mods["dropout_p"], device, shape)


def make_inputs(case: Case, device, seed: int = 0):
    """q, k, v (in the case's layout and strides, requiring grad) and the output gradient do."""
    gen = torch.Generator().manual_seed(seed)

    def rand(heads, seqlen, dim, scale=1.0):
        last = 2 * dim if case.strided else dim
        shape = (case.batch, heads, seqlen, last) if case.layout == "bhsd" else (case.batch, seqlen, heads, last)
        t = (torch.randn(shape, generator=gen) * scale).to(device=device, dtype=case.dtype)
        t = t[..., ::2] if case.strided else t
        return t.requires_grad_()

    q = rand(case.heads_q, case.seqlen_q, case.head_dim, case.logit_scale)
    k = rand(case.heads_kv, case.seqlen_k, case.head_dim)
    v = rand(case.heads_kv, case.seqlen_k, case.dv)
    shape = list(q.shape[:-1]) + [case.dv]
    do = torch.randn(shape, generator=gen).to(device=device, dtype=case.dtype)
    return q, k, v, do


@dataclass
class Result:
    case: Case
    metrics: dict = field(default_factory=dict)
    launches: dict = field(default_factory=dict)  # Triton launches this evaluation made, per kernel

    @property
    def ok(self) -> bool:
        return all(m.ok for m in self.metrics.values())

    def describe(self) -> str:
        return self.case.name + ": " + ", ".join(
            f"{n} err {m.err:.2e} (pt {m.pt_err:.2e}, budget {m.budget:.2e})" for n, m in self.metrics.items())


def _run(fn, q, k, v, do, grad, extras=None):
    """fn(q, k, v) -> (out, lse), and with grad the gradients of q, k, v and of the `extras` ({name: tensor}, e.g.
    "dbias": a float attn_mask, "dsinks": the sinks) that fn uses."""
    out, lse = fn(q, k, v)
    extras = extras or {}
    grads = torch.autograd.grad(out, (q, k, v, *extras.values()), do.to(out.dtype)) if grad else ()
    return dict(zip(("out", "lse", "dq", "dk", "dv", *extras), (out, lse, *grads)))


def _measure(case: Case, got: dict, q, k, v, do, grad: bool, launched=None, mods=None) -> Result:
    """Metrics of the kernels' results `got` for inputs q, k, v (and output gradient do) of `case` against the
    float64 reference, with PyTorch in the input dtype as the yardstick. mods: the reference's softcap /
    alibi_slopes / dropout_p / dropout_mask / mask_mod / score_mod / attn_mask / sinks; got["dbias"] and
    got["dsinks"], where measured, are a float attn_mask's and the sinks' gradients."""
    kw = dict(causal=case.causal, window_size=case.window, layout=case.layout, scale=case.scale, return_lse=True,
              **(mods or {}))
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    extras = {}
    for name, arg in (("dbias", "attn_mask"), ("dsinks", "sinks")):
        if name in got:
            extras[name] = kw[arg] = kw[arg].detach().requires_grad_()
    probs = []

    def ref_fn(*a):
        out, lse, p = reference.attention(*a, **kw, upcast=torch.float64, return_probs=True)
        probs.append(p)
        return out, lse
    ref = _run(ref_fn, q, k, v, do, grad, extras)
    pt = _run(lambda *a: reference.attention(*a, **kw, upcast=None), q, k, v, do, grad, extras)
    extra = {}
    if grad:
        bhsd = (lambda t: t.transpose(1, 2)) if case.layout == "bshd" else (lambda t: t)
        scale = case.head_dim ** -0.5 if case.scale is None else case.scale
        extra = delta_noise(bhsd(q.double()), bhsd(k.double()), bhsd(ref["out"].detach()), bhsd(do.double()),
                             probs[0].detach(), scale, extras["dbias"].shape if "dbias" in extras else None,
                             ref["lse"].detach(), kw.get("sinks"))
    res = Result(case, launches=launched or {})
    for name in got:
        res.metrics[name] = Metric.measure(got[name], ref[name], pt[name], case.dtype, FACTORS[name],
                                           extra.get(name, 0.0))
    return res


def _launched(before: dict) -> dict:
    return {n: kernels.launches[n] - before.get(n, 0) for n in kernels.launches}


def evaluate(case: Case, device, grad: bool = True, seed: int = 0) -> Result:
    """Run fused_attn forward (and backward) on one case and measure it against the float64 reference."""
    q, k, v, do = make_inputs(case, device, seed)
    mods = kernel_modifiers(case, case.batch, device)
    kw = dict(causal=case.causal, window_size=case.window, layout=case.layout, scale=case.scale, return_lse=True,
              **mods)
    before = dict(kernels.launches)
    got, mask = run_with_mask(lambda: _run(lambda *a: attention(*a, **kw), q, k, v, do, grad), mods, device,
                              (case.batch, case.heads_q, case.seqlen_q, case.seqlen_k))
    return _measure(case, got, q, k, v, do, grad, _launched(before), dict(mods, dropout_mask=mask))


@dataclass(frozen=True)
class VarlenCase:
    """Packed sequences: sequence b has seqlens_q[b] queries and seqlens_k[b] keys; `tail` spare rows follow the
    last sequence in q and k (rows no sequence covers)."""
    seqlens_q: tuple
    seqlens_k: tuple
    heads_q: int
    heads_kv: int
    head_dim: int
    head_dim_v: int = None
    dtype: torch.dtype = torch.float16
    causal: bool = False
    window: tuple = (-1, -1)
    strided: bool = False
    tail: int = 0
    scale: float = None
    softcap: float = 0.0
    alibi: str = None
    dropout: float = 0.0

    def sequence(self, b: int) -> Case:
        """Sequence b as a dense case (batch 1, layout bshd: the packed rows of one sequence)."""
        return Case(1, self.heads_q, self.heads_kv, self.seqlens_q[b], self.seqlens_k[b], self.head_dim,
                    self.head_dim_v, self.dtype, self.causal, self.window, "bshd", self.strided, scale=self.scale,
                    softcap=self.softcap, alibi=self.alibi, dropout=self.dropout)


def make_varlen_inputs(case: VarlenCase, device, seed: int = 0):
    """Packed q, k, v (requiring grad; every other element of the head dim if strided), do, cu_seqlens_q / _k."""
    gen = torch.Generator().manual_seed(seed)
    dv = case.head_dim if case.head_dim_v is None else case.head_dim_v

    def rand(rows, heads, dim, grad=True):
        last = 2 * dim if case.strided else dim
        t = torch.randn(rows + case.tail, heads, last, generator=gen).to(device=device, dtype=case.dtype)
        t = t[..., ::2] if case.strided else t
        return t.requires_grad_(grad)

    total_q, total_k = sum(case.seqlens_q), sum(case.seqlens_k)
    q, k, v = rand(total_q, case.heads_q, case.head_dim), rand(total_k, case.heads_kv, case.head_dim), rand(
        total_k, case.heads_kv, dv)
    do = rand(total_q, case.heads_q, dv, grad=False)
    return q, k, v, do, cu_seqlens(case.seqlens_q, device), cu_seqlens(case.seqlens_k, device)


@dataclass
class VarlenResult:
    case: VarlenCase
    sequences: list  # a Result per sequence with queries, in order
    zeros: dict  # rows nothing reaches (past the last sequence; keys of a sequence without queries): max |x|, must be 0
    launches: dict

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.sequences) and not any(self.zeros.values())

    def describe(self) -> str:
        bad = [r.describe() for r in self.sequences if not r.ok]
        return "; ".join(bad + [f"{n}: {x}" for n, x in self.zeros.items() if x]) or "ok"


def _unreached(x: torch.Tensor) -> float:
    """max |x| over rows nothing should reach (0 for no rows)."""
    return x.float().abs().max().item() if x.numel() else 0.0


def evaluate_varlen(case: VarlenCase, device, grad: bool = True, seed: int = 0) -> VarlenResult:
    """attention_varlen forward (and backward) on packed sequences, each sequence's slice of the results measured
    against the float64 reference on that sequence alone (a sequence without keys: exactly out 0, lse -inf,
    dq 0); rows nothing reaches must hold out 0, lse -inf and zero gradients."""
    q, k, v, do, cu_q, cu_k = make_varlen_inputs(case, device, seed)
    max_q, max_k = max(case.seqlens_q), max(case.seqlens_k)
    mods = kernel_modifiers(case, len(case.seqlens_q), device)
    before = dict(kernels.launches)
    got, mask = run_with_mask(
        lambda: _run(lambda *a: attention_varlen(*a, cu_q, cu_k, max_q, max_k, causal=case.causal,
                                                 window_size=case.window, scale=case.scale, return_lse=True, **mods),
                     q, k, v, do, grad), mods, device, (len(case.seqlens_q), case.heads_q, max_q, max_k))
    launched = _launched(before)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    sequences, zeros = [], {}
    for b, (q0, q1, k0, k1) in enumerate(zip(cq, cq[1:], ck, ck[1:])):
        if q1 == q0:  # its keys, if any, get no gradient
            zeros.update({f"{n}[seq {b}]": _unreached(got[n][k0:k1]) for n in ("dk", "dv") if n in got})
            continue
        part = {n: (t[:, q0:q1] if n == "lse" else t[q0:q1] if n in ("out", "dq") else t[k0:k1])[None]
                for n, t in got.items()}
        seq = case.sequence(b)
        if k1 > k0:
            seq_mods = dict(mods, alibi_slopes=reference.row_slopes(mods["alibi_slopes"], b),
                            dropout_mask=None if mask is None else mask[b:b + 1, :, :q1 - q0, :k1 - k0])
            sequences.append(_measure(seq, part, q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], do[None, q0:q1],
                                      grad, mods=seq_mods))
            continue
        res = Result(seq)  # no key: nothing visible
        for n in ("out", "lse", "dq"):
            if n in part:
                ref = torch.full_like(part[n], float("-inf")) if n == "lse" else torch.zeros_like(part[n])
                res.metrics[n] = Metric.measure(part[n], ref, ref, case.dtype, FACTORS[n])
        sequences.append(res)
    zeros.update({f"{n}[tail]": _unreached(got[n][cq[-1]:]) for n in ("out", "dq") if n in got})
    zeros.update({f"{n}[tail]": _unreached(got[n][ck[-1]:]) for n in ("dk", "dv") if n in got})
    zeros["lse[tail] not -inf"] = int((~torch.isneginf(got["lse"][:, cq[-1]:])).sum())
    return VarlenResult(case, sequences, zeros, launched)


def make_kvcache_inputs(B, Sq, Hq, Hkv, D, S_cache, S_new, dtype, device, page=0, seed=0, dv=None):
    """q (B, Sq, Hq, D), caches (contiguous (B, S_cache, Hkv, D), or paged with a shuffled block table and a few
    pages no row uses), new k / v (B, S_new, Hkv, D / dv) or None: (q, k_cache, v_cache, block_table, k, v)."""
    g = torch.Generator().manual_seed(seed)
    dv = dv or D
    rand = (lambda *shape: torch.randn(*shape, generator=g).to(device, dtype))
    q = rand(B, Sq, Hq, D)
    k_new, v_new = (rand(B, S_new, Hkv, d) for d in (D, dv)) if S_new else (None, None)
    if not page:
        return q, rand(B, S_cache, Hkv, D), rand(B, S_cache, Hkv, dv), None, k_new, v_new
    per_row = -(-S_cache // page)
    n_pages = B * per_row + 3
    table = torch.randperm(n_pages, generator=g)[:B * per_row].view(B, per_row).to(device, torch.int32)
    return q, rand(n_pages, page, Hkv, D), rand(n_pages, page, Hkv, dv), table, k_new, v_new


def evaluate_kvcache(q, k_cache, v_cache, block_table, k, v, cache_seqlens, num_splits=0, **kw):
    """attention_with_kvcache (which appends k / v to the caches in place) against the float64 reference on the
    caches as they were: ((out, lse), {"out": Metric, "lse": Metric})."""
    ref_kw = dict(cache_seqlens=cache_seqlens, block_table=block_table, return_lse=True, **kw)
    ref = reference.attention_with_kvcache(q, k_cache, v_cache, k, v, upcast=torch.float64, **ref_kw)
    pt = reference.attention_with_kvcache(q, k_cache, v_cache, k, v, upcast=None, **ref_kw)
    got = attention_with_kvcache(q, k_cache, v_cache, k, v, num_splits=num_splits, **ref_kw)
    return got, {n: Metric.measure(x, r, p, q.dtype, FACTORS[n]) for n, x, r, p in zip(("out", "lse"), got, ref, pt)}


def make_serving_inputs(lens_q, lens_k, Hq, Hkv, D, dtype, device, page, seed=0, dv=None):
    """A packed batch over a paged cache: q (sum(lens_q) + 2 rows no sequence covers, Hq, D), caches (num_pages,
    page, Hkv, D / dv) whose pages are handed out in shuffled order (a few unused), cu_seqlens_q, seqused_k =
    lens_k and the block table: (q, k_cache, v_cache, cu_seqlens_q, seqused_k, block_table)."""
    g = torch.Generator().manual_seed(seed)
    rand = (lambda *shape: torch.randn(*shape, generator=g).to(device, dtype))
    per_seq = [-(-n // page) for n in lens_k]
    n_pages = sum(per_seq) + 3
    order = torch.randperm(n_pages, generator=g).tolist()
    table = torch.zeros(len(lens_k), max(max(per_seq), 1), dtype=torch.int32)
    for b, n in enumerate(per_seq):
        table[b, :n] = torch.tensor(order[:n], dtype=torch.int32)
        order = order[n:]
    q = rand(sum(lens_q) + 2, Hq, D)
    return (q, rand(n_pages, page, Hkv, D), rand(n_pages, page, Hkv, dv or D), cu_seqlens(lens_q, device),
            torch.tensor(lens_k, dtype=torch.int32, device=device), table.to(device))


@contextlib.contextmanager
def nan_filled_empty():
    """Inside the block, torch.empty and its kin return NaN-filled float tensors (torch's deterministic mode
    fills uninitialized memory): a row the kernels leave unwritten shows, whatever the allocator hands back."""
    mode, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(mode, warn_only=warn)


def evaluate_serving(q, k_cache, v_cache, cu_seqlens_q, seqused_k, block_table, num_splits=0, **kw):
    """attention_varlen over a paged cache (its buffers NaN where unwritten: nan_filled_empty) against the float64
    reference (each sequence's keys gathered from its pages): ((out, lse), {"out": Metric, "lse": Metric})."""
    args = (q, k_cache, v_cache, cu_seqlens_q, None, int(torch.diff(cu_seqlens_q).max()), int(seqused_k.max()))
    ref_kw = dict(seqused_k=seqused_k, block_table=block_table, return_lse=True, **kw)
    ref = reference.attention_varlen(*args, upcast=torch.float64, **ref_kw)
    pt = reference.attention_varlen(*args, upcast=None, **ref_kw)
    with nan_filled_empty():
        got = attention_varlen(*args, num_splits=num_splits, **ref_kw)
    return got, {n: Metric.measure(x, r, p, q.dtype, FACTORS[n]) for n, x, r, p in zip(("out", "lse"), got, ref, pt)}


def evaluate_fp8(q, k, v, q_descale, k_descale, v_descale, layout="bhsd", out_dtype=None, **kw):
    """FP8 attention (q, k, v FP8 with their descales) against the float64 reference fed the dequantized tensors,
    by the FP8 rule (fused_attn.numerics: P's rounding to FP8 as the floor, PyTorch in the output dtype as pt):
    ((out, lse), {"out": Metric, "lse": Metric})."""
    d = dict(q_descale=q_descale, k_descale=k_descale, v_descale=v_descale, layout=layout, return_lse=True, **kw)
    got = attention(q, k, v, out_dtype=out_dtype, **d)
    ref, ref_lse, probs = reference.attention(q, k, v, upcast=torch.float64, return_probs=True, **d)
    pt, pt_lse = reference.attention(q, k, v, upcast=out_dtype, **d)  # None: bfloat16
    vh = v.transpose(1, 2) if layout == "bshd" else v
    B, Hkv = vh.shape[:2]
    vd = v_descale.double()
    v_deq = vh.double() * (vd.reshape(1, 1) if vd.numel() == 1 else vd)[:, :, None, None]
    floor = fp8_p_floor(probs, v_deq.repeat_interleave(probs.shape[1] // Hkv, dim=1), q.dtype)
    out_dtype = got[0].dtype
    return got, {"out": Metric.measure(got[0], ref, pt, out_dtype, FACTORS["out"], extra_floor=floor),
                 "lse": Metric.measure(got[1], ref_lse, pt_lse, torch.float32, FACTORS["lse"])}


READERS = ("tolist", "item", "numpy", "__int__", "__float__", "__bool__", "__index__")


class Syncs(TorchDispatchMode):
    """The ops of a call that read a tensor's value on the host, or size a result by its values: aten ops seen by
    dispatch, and the Tensor methods that read values without dispatching an op (tolist, int(t), ...)."""

    def __init__(self):
        super().__init__()
        self.seen = []
        self.saved = {}

    def __enter__(self):
        for name in READERS:
            method = self.saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._reader(name, method))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, method)
        return super().__exit__(*exc)

    def _reader(self, name, method):
        def read(t, *args, **kwargs):
            self.seen.append(name)
            return method(t, *args, **kwargs)
        return read

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        bool_index = name.startswith(("index.", "index_put")) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for a in args if isinstance(a, (list, tuple)) for i in a)
        if name.startswith(("_local_scalar_dense", "nonzero", "masked_select", "unique")) or bool_index:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))
