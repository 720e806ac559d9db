"""Masks of any shape (`python -m bench --flex`): fused_attn.flex_attention with block masks beside PyTorch's
FlexAttention (compiled) on the same mask functions, and beside fused_attn's built-in mask where the function
equals one (the cost of a mask function over the band it equals). Masks: documents (16k tokens in 50 documents of
mixed lengths, causal within each), prefix-LM (a bidirectional prefix of 1024), a sliding window of 1024 and
causal, each written as a mask function -- in Python (`fused_attn-flex`, bits for the partial blocks) and as a
@triton.jit function (`fused_attn-flex-jit`, evaluated in the kernels). The same masks as dense bool tensors run
through the SDPA drop-in (`fused_attn-sdpa-mask`) beside torch's SDPA on its memory-efficient backend
(`sdpa-efficient`, the one that takes an arbitrary mask). Rows also record the time to build the block mask. TF/s
count the pairs the mask leaves visible, exactly."""
import functools
import time
from dataclasses import asdict, dataclass

import torch
import triton
import triton.language as tl

import fused_attn

from . import common
from .common import DTYPES, Unsupported
from .providers import flex
from .sweep import MODE_FLOP_FACTOR

MASKS = ("documents", "prefix_lm", "sliding1024", "causal")
MODES = ("fwd", "fwd+bwd")
SEQLEN, PREFIX, WINDOW = 16384, 1024, 1024


def document_ids(seqlen: int, device, n_docs: int = 50):
    """Sequence ids of n_docs documents of mixed lengths (a fixed draw) covering seqlen tokens."""
    g = torch.Generator().manual_seed(0)
    cuts = torch.randperm(seqlen - 1, generator=g)[:n_docs - 1].sort().values + 1
    return torch.bucketize(torch.arange(seqlen), cuts, right=True).to(device)


def mask_function(name: str, seqlen: int, device):
    """The case's mask function (FlexAttention's signature), and the built-in (causal, window_size) it equals or
    None."""
    if name == "documents":
        doc = document_ids(seqlen, device)
        return (lambda b, h, q, kv: (doc[q] == doc[kv]) & (q >= kv)), None
    if name == "prefix_lm":
        return (lambda b, h, q, kv: (kv < PREFIX) | (q >= kv)), None
    if name.startswith("sliding"):
        w = int(name[len("sliding"):])
        return (lambda b, h, q, kv: (q >= kv) & (q - kv < w)), (True, (w - 1, 0))
    return (lambda b, h, q, kv: q >= kv), (True, (-1, -1))


@triton.jit
def _documents_jit(b, h, q_idx, kv_idx, DOC):
    return (tl.load(DOC + q_idx) == tl.load(DOC + kv_idx)) & (q_idx >= kv_idx)


@triton.jit
def _prefix_lm_jit(b, h, q_idx, kv_idx, prefix):
    return (kv_idx < prefix) | (q_idx >= kv_idx)


@triton.jit
def _sliding_jit(b, h, q_idx, kv_idx, window):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < window)


def jit_mask_function(name: str, seqlen: int, device):
    """The case's mask as a @triton.jit function and its mod_args."""
    if name == "documents":
        return _documents_jit, (document_ids(seqlen, device),)
    if name == "prefix_lm":
        return _prefix_lm_jit, (PREFIX,)
    return _sliding_jit, (int(name[len("sliding"):]) if name.startswith("sliding") else seqlen,)


@dataclass(frozen=True)
class Case:
    mask: str
    head_dim: int
    mode: str
    heads: int
    seqlen: int = SEQLEN
    dtype: str = "bf16"

    def as_dict(self) -> dict:
        return dict(asdict(self), batch=1, heads_q=self.heads, heads_kv=self.heads)


def build(head_dims=(64, 128), masks=MASKS, modes=MODES, hidden=2048, dtype="bf16", seqlen=SEQLEN):
    return [Case(m, d, mode, hidden // d, seqlen, dtype) for d in head_dims for m in masks for mode in modes]


def build_from(args):
    return build(args.head_dims or (64, 128), args.masks or MASKS, args.modes or MODES, args.hidden or 2048,
                 args.dtype, (args.seqlens or [SEQLEN])[0])


def visible_pairs(bm) -> int:
    """Exact visible (query, key) pairs of a fused_attn BlockMask: full blocks whole, partial ones by their bits
    (blocks crossing the sequence ends are partial, so their padding is never counted)."""
    t = bm.tables
    bq, bk = bm.BLOCK_SIZE
    return int(t.kv[..., 1].sum()) * bq * bk + int(t.bits.sum()) if t.kv.shape[:2] == (1, 1) else None


def _inputs(case, device, requires_grad, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return tuple(torch.randn(1, case.heads, case.seqlen, case.head_dim, device=device, dtype=DTYPES[case.dtype],
                             generator=g).requires_grad_(requires_grad) for _ in range(3))


def _block_mask(case, device):
    fn, _ = mask_function(case.mask, case.seqlen, device)
    return fused_attn.create_block_mask(fn, None, None, case.seqlen, case.seqlen, device=device)


def _block_mask_jit(case, device):
    fn, args = jit_mask_function(case.mask, case.seqlen, device)
    return fused_attn.create_block_mask(fn, None, None, case.seqlen, case.seqlen, device=device, mod_args=args)


def _flex_block_mask(case, device):
    fn, _ = mask_function(case.mask, case.seqlen, device)
    return flex()[1](fn, None, None, case.seqlen, case.seqlen, device=device)


def _ours(case, q, k, v):
    bm = _block_mask(case, q.device)
    return lambda: fused_attn.flex_attention(q, k, v, block_mask=bm)


def _ours_jit(case, q, k, v):
    bm = _block_mask_jit(case, q.device)
    return lambda: fused_attn.flex_attention(q, k, v, block_mask=bm)


def _dense_mask(case, device):
    fn, _ = mask_function(case.mask, case.seqlen, device)
    i = torch.arange(case.seqlen, device=device)
    return fn(0, 0, i[:, None], i[None, :])


def _sdpa_mask(case, q, k, v):
    mask = _dense_mask(case, q.device)
    return lambda: fused_attn.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _sdpa_efficient(case, q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    mask = _dense_mask(case, q.device)

    def run():
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return run


def _builtin(case, q, k, v):
    _, band = mask_function(case.mask, case.seqlen, q.device)
    if band is None:
        raise Unsupported("no built-in mask equals this mask function")
    causal, window = band
    return lambda: fused_attn.attention(q, k, v, causal=causal, window_size=window)


def _flex(case, q, k, v):
    bm = _flex_block_mask(case, q.device)
    return lambda: flex()[0](q, k, v, block_mask=bm)


PROVIDERS = {"fused_attn-flex": _ours, "fused_attn-flex-jit": _ours_jit, "fused_attn-builtin": _builtin, "flex": _flex,
             "fused_attn-sdpa-mask": _sdpa_mask, "sdpa-efficient": _sdpa_efficient}
BUILDERS = {"fused_attn-flex": _block_mask, "fused_attn-flex-jit": _block_mask_jit, "flex": _flex_block_mask}


def check(name, case, device, cache):
    """The provider on a small case of the same mask (512 tokens) against the float64 reference (common.check)."""
    small = Case(case.mask.replace("1024", "100"), case.head_dim, "fwd", 2, 512, case.dtype)
    q, k, v = _inputs(small, device, False)
    fn, _ = mask_function(small.mask, small.seqlen, device)
    return common.check(cache, (name, case.head_dim, case.mask), lambda: PROVIDERS[name](small, q, k, v)(),
                        lambda upcast: fused_attn.reference.attention(q, k, v, mask_mod=fn, upcast=upcast))


def measure(name, case, device):
    return common.measure(PROVIDERS[name], case, _inputs(case, device, case.mode != "fwd"))


def mask_build_ms(name, case, device) -> float:
    """Milliseconds to build the provider's block mask (after one warm-up build), None where it builds none."""
    if name not in BUILDERS:
        return None
    BUILDERS[name](case, device)
    torch.cuda.synchronize()
    start = time.perf_counter()
    BUILDERS[name](case, device)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


@functools.lru_cache(maxsize=None)
def mask_pairs(mask: str, seqlen: int, device: str = "cuda") -> int:
    """The visible pairs of a case's mask, built once per (mask, length) for every row that counts its FLOPs."""
    fn, _ = mask_function(mask, seqlen, device)
    return visible_pairs(fused_attn.create_block_mask(fn, None, None, seqlen, seqlen, device))


def derived(case, name, ms) -> dict:
    flops = 4.0 * case.heads * case.head_dim * mask_pairs(case.mask, case.seqlen) * MODE_FLOP_FACTOR[case.mode]
    return {"tflops": flops / (ms * 1e-3) / 1e12, "mask_build_ms": mask_build_ms(name, case, "cuda")}


def label(case) -> str:
    return f"flex {case.mask:11} S={case.seqlen} D={case.head_dim:3} H={case.heads} {case.mode:8}"


def describe(case) -> str:
    return label(case)

