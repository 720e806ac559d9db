"""The decode sweep (`python -m bench --decode`): Sq = 1 or 4 new query rows against a KV cache of 1k..128k tokens
per row, Hq / Hkv = 32 / 8, D = 128, contiguous or paged (pages of 16 or 256): fused_attn's split-KV kernels beside
SDPA on the cache (flash / efficient / cuDNN) and FlexAttention (compiled; its decoding path for small Sq). Reported:
time, K/V bytes read per second, and that as a fraction of the GPU's memory bandwidth. Every row's cache holds
`cache` tokens; the peers read a contiguous cache (paged rows: unsupported)."""
from dataclasses import asdict, dataclass

import torch

import fused_attn

from . import common
from .common import DTYPES, Unsupported, probe
from .providers import flex, invariant

BATCHES = (1, 8, 32)
CACHES = (1024, 8192, 32768, 131072)
SQS = (1, 4)
PAGES = (0, 16, 256)  # 0: contiguous


@dataclass(frozen=True)
class Case:
    batch: int
    cache: int
    sq: int
    page: int  # 0: contiguous
    heads_q: int = 32
    heads_kv: int = 8
    head_dim: int = 128
    dtype: str = "bf16"

    def kv_bytes(self) -> int:
        """Bytes of K and V a call must read."""
        return 2 * self.batch * self.cache * self.heads_kv * self.head_dim * torch.finfo(DTYPES[self.dtype]).bits // 8

    def as_dict(self) -> dict:
        return dict(asdict(self), seqlen=self.cache, mask="causal", mode="decode")


def build(batches=BATCHES, caches=CACHES, sqs=SQS, pages=PAGES, dtype="bf16", head_dims=(128,)):
    return [Case(b, c, s, p, head_dim=d, dtype=dtype) for d in head_dims for b in batches for c in caches for s in sqs
            for p in pages]


def build_from(args):
    """--seqlens are the cache lengths (default CACHES); --head-dims default to 128."""
    return build(caches=args.seqlens or CACHES, dtype=args.dtype, head_dims=args.head_dims or (128,))


def inputs(case: Case, device, seed=0):
    """q (B, Sq, Hq, D); the cache contiguous (B, S, Hkv, D), or paged with a shuffled block table; lengths."""
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = DTYPES[case.dtype]
    rand = (lambda *shape: torch.randn(*shape, device=device, dtype=dtype, generator=g))
    q = rand(case.batch, case.sq, case.heads_q, case.head_dim)
    lens = torch.full((case.batch,), case.cache, dtype=torch.int32, device=device)
    if not case.page:
        return q, rand(case.batch, case.cache, case.heads_kv, case.head_dim), rand(
            case.batch, case.cache, case.heads_kv, case.head_dim), None, lens
    per_row = -(-case.cache // case.page)
    pages = case.batch * per_row
    table = torch.randperm(pages, device=device, generator=g).view(case.batch, per_row).to(torch.int32)
    shape = (pages, case.page, case.heads_kv, case.head_dim)
    return q, rand(*shape), rand(*shape), table, lens


def _fused(case, q, kc, vc, table, lens):
    return lambda: fused_attn.attention_with_kvcache(q, kc, vc, cache_seqlens=lens, block_table=table, causal=True)


def _contiguous_only(case):
    if case.page:
        raise Unsupported("reads a contiguous cache only")


def _sdpa(backend_name):
    def make(case, q, kc, vc, table, lens):
        _contiguous_only(case)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        qh, kh, vh = (t.transpose(1, 2) for t in (q, kc, vc))
        # Bottom-right causal for Sq > 1: query i sees keys j <= S - Sq + i.
        mask = None
        if case.sq > 1:
            j = torch.arange(case.cache, device=q.device)
            mask = j[None, :] <= case.cache - case.sq + torch.arange(case.sq, device=q.device)[:, None]

        def fn():
            with sdpa_kernel([getattr(SDPBackend, backend_name)]):
                out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, enable_gqa=True)
            return out.transpose(1, 2)
        return probe(fn)
    return make


def _flex(case, q, kc, vc, table, lens):
    _contiguous_only(case)
    flex_attention, create_block_mask = flex()
    shift = case.cache - case.sq

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + shift

    block_mask = create_block_mask(mask_mod, None, None, case.sq, case.cache, device=q.device)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, kc, vc))
    return lambda: flex_attention(qh, kh, vh, block_mask=block_mask, enable_gqa=True).transpose(1, 2)


PROVIDERS = {
    "fused_attn-kvcache": _fused,
    "fused_attn-kvcache-invariant": invariant(_fused),
    "sdpa-flash": _sdpa("FLASH_ATTENTION"),
    "sdpa-efficient": _sdpa("EFFICIENT_ATTENTION"),
    "sdpa-cudnn": _sdpa("CUDNN_ATTENTION"),
    "flex": _flex,
}


def check(name, case, device, cache):
    """The provider on a small case of the same kind (paging, Sq) against the float64 reference. Cached."""
    small = Case(2, 300, case.sq, 16 if case.page else 0, 4, 2, 64, case.dtype)
    q, kc, vc, table, lens = inputs(small, device)
    kw = dict(cache_seqlens=lens, block_table=table, causal=True)
    return common.check(cache, (name, case.sq, bool(case.page)),
                        lambda: PROVIDERS[name](small, q, kc, vc, table, lens)(),
                        lambda upcast: fused_attn.reference.attention_with_kvcache(q, kc, vc, upcast=upcast, **kw))


def measure(name, case, device):
    """(status, ms, None): the median time of one call."""
    return common.time_step(lambda: PROVIDERS[name](case, *inputs(case, device)))


def derived(case, name, ms) -> dict:
    return common.bandwidth(case.kv_bytes(), ms)


def label(case) -> str:
    return f"decode B={case.batch:3} cache={case.cache:7} Sq={case.sq} page={case.page or '-':>4} D={case.head_dim}"


def describe(case) -> str:
    return f"{label(case)} {case.kv_bytes() / 2**20:9.1f} MiB of K/V"
