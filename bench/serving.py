"""The serving step (`python -m bench --serving`): one packed batch the way inference servers run it -- a prefill
chunk of 2,048 queries and 63 single-token decodes, or 64 decodes -- each sequence attending causally to its own
pages of a shared paged KV cache (4k..32k keys per sequence, pages of 16 or 256, bf16 or FP8 e4m3 caches), GQA
32 / 8, D = 128. Providers: fused_attn's one call (attention_varlen with block_table / seqused_k), fused_attn's
two separate calls (the chunk and the decodes through attention_with_kvcache), FlashAttention's varlen kernel
through PyTorch (torch.nn.attention.varlen.varlen_attn, paged, where this torch has it) and FlexAttention over the
paged cache itself (a block mask of physical pages, as its experimental PagedAttention builds; paged_block_mask).
Reported: time, K/V bytes read per second (FP8 caches counted at their byte size) and that as a fraction of the
GPU's memory bandwidth."""
from dataclasses import asdict, dataclass

import torch

import fused_attn
from fused_attn.varlen import cu_seqlens

from . import common
from .common import DTYPES, Unsupported, probe
from .providers import flex

CACHES = (4096, 16384, 32768)
PAGES = (16, 256)
STEPS = ((2048, 63), (0, 64))  # (prefill chunk queries, decodes)
KV_TYPES = {"bf16": None, "fp8": torch.float8_e4m3fn}  # None: the queries' dtype


@dataclass(frozen=True)
class Case:
    chunk: int  # queries of the prefill chunk (0: none)
    decodes: int
    cache: int  # keys per sequence, the chunk's own included
    page: int
    kv: str = "bf16"
    heads_q: int = 32
    heads_kv: int = 8
    head_dim: int = 128
    dtype: str = "bf16"

    @property
    def lens_q(self):
        return ([self.chunk] if self.chunk else []) + [1] * self.decodes

    def kv_bytes(self) -> int:
        """Bytes of K and V the step must read: every sequence's cache once."""
        size = 1 if self.kv == "fp8" else torch.finfo(DTYPES[self.dtype]).bits // 8
        return 2 * len(self.lens_q) * self.cache * self.heads_kv * self.head_dim * size

    def as_dict(self) -> dict:
        return dict(asdict(self), seqlen=self.cache, batch=len(self.lens_q), mask="causal", mode="fwd")


def build(caches=CACHES, pages=PAGES, kv_types=tuple(KV_TYPES), dtype="bf16", head_dims=(128,)):
    return [Case(c, n, s, p, kv, head_dim=d, dtype=dtype) for d in head_dims for c, n in STEPS for s in caches
            for p in pages for kv in kv_types]


def build_from(args):
    """--seqlens are the cache lengths (default CACHES); --head-dims default to 128."""
    return build(caches=args.seqlens or CACHES, dtype=args.dtype, head_dims=args.head_dims or (128,))


def inputs(case: Case, device, seed=0):
    """q (total, Hq, D), the paged caches (their pages handed out in shuffled order), cu_seqlens_q, seqused_k,
    block table, descales (None for 16-bit caches)."""
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = DTYPES[case.dtype]
    n = len(case.lens_q)
    per_seq = -(-case.cache // case.page)
    q = torch.randn(sum(case.lens_q), case.heads_q, case.head_dim, device=device, dtype=dtype, generator=g)
    shape = (n * per_seq, case.page, case.heads_kv, case.head_dim)
    kc, vc = (torch.randn(*shape, device=device, dtype=dtype, generator=g) for _ in range(2))
    table = torch.randperm(n * per_seq, device=device, generator=g).view(n, per_seq).to(torch.int32)
    used = torch.full((n,), case.cache, dtype=torch.int32, device=device)
    descales = None
    if KV_TYPES[case.kv] is not None:
        kc, vc = kc.to(KV_TYPES[case.kv]), vc.to(KV_TYPES[case.kv])
        descales = torch.ones(n, case.heads_kv, device=device)
    return q, kc, vc, cu_seqlens(case.lens_q, device), used, table, descales


def _descales(descales):
    return {} if descales is None else dict(k_descale=descales, v_descale=descales)


def _fused(case, q, kc, vc, cu, used, table, descales):
    return lambda: fused_attn.attention_varlen(q, kc, vc, cu, None, max(case.lens_q), case.cache, seqused_k=used,
                                               block_table=table, causal=True, **_descales(descales))


def _fused_separate(case, q, kc, vc, cu, used, table, descales):
    """The chunk and the decodes as two attention_with_kvcache calls (what a caller without the packed call runs)."""
    n_chunk = 1 if case.chunk else 0
    parts = []
    if case.chunk:
        parts.append((q[None, :case.chunk], slice(0, 1)))
    parts.append((q[case.chunk:, None], slice(n_chunk, None)))

    def fn():
        outs = []
        for qs, rows in parts:
            kw = {} if descales is None else dict(k_descale=descales[rows], v_descale=descales[rows])
            outs.append(fused_attn.attention_with_kvcache(qs, kc, vc, cache_seqlens=used[rows], block_table=table[rows],
                                                          causal=True, **kw).flatten(0, 1))
        return torch.cat(outs)
    return fn


def _flash_varlen(case, q, kc, vc, cu, used, table, descales):
    if descales is not None:
        raise Unsupported("varlen_attn takes no FP8 caches")
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as e:
        raise Unsupported(f"no torch.nn.attention.varlen in this torch: {e}") from None
    cu_k = cu_seqlens([case.cache] * len(case.lens_q), q.device)
    fn = (lambda: varlen_attn(q, kc, vc, cu, cu_k, max(case.lens_q), case.cache, window_size=(-1, 0), enable_gqa=True,
                              seqused_k=used, block_table=table))
    try:
        return probe(fn)
    except TypeError as e:  # a torch whose varlen_attn has no paged form
        raise Unsupported(str(e)[:200]) from None


def paged_block_mask(case, q, cu, table, create_block_mask):
    """(FlexAttention block mask over the paged cache's physical pages laid end to end, its mask function): one page
    per KV block, the indices the sequences' physical pages -- the logical mask (each sequence's keys causally,
    bottom-right) mapped through the block table, as FlexAttention's experimental PagedAttention does."""
    from torch.nn.attention.flex_attention import BlockMask
    dev, P, S = q.device, case.page, case.cache
    n, per_seq = table.shape
    span = per_seq * P  # keys per sequence in the logical layout
    lens = torch.tensor(case.lens_q, device=dev)
    q_seq = torch.repeat_interleave(torch.arange(n, device=dev), lens)
    q_pos = torch.arange(q.shape[0], device=dev) - cu[:-1].long()[q_seq] + S - lens[q_seq]  # its own key position
    pages = table.flatten().long()  # logical page b * per_seq + l -> physical page
    logical = torch.empty_like(pages)
    logical[pages] = torch.arange(pages.numel(), device=dev)  # physical page -> logical page

    def logical_mask(b, h, q_idx, kv_idx):
        return (q_seq[q_idx] == kv_idx // span) & (kv_idx % span <= q_pos[q_idx])

    def physical_mask(b, h, q_idx, kv_idx):
        return logical_mask(b, h, q_idx, logical[kv_idx // P] * P + kv_idx % P)

    lm = create_block_mask(logical_mask, None, None, q.shape[0], n * span, device=dev, BLOCK_SIZE=(128, P))
    to_physical = lambda idx: None if idx is None else pages[idx.long()].to(torch.int32)  # noqa: E731
    return BlockMask.from_kv_blocks(lm.kv_num_blocks, to_physical(lm.kv_indices), lm.full_kv_num_blocks,
                                    to_physical(lm.full_kv_indices), BLOCK_SIZE=lm.BLOCK_SIZE, mask_mod=physical_mask,
                                    seq_lengths=(q.shape[0], pages.numel() * P)), physical_mask


def _flex(case, q, kc, vc, cu, used, table, descales):
    """FlexAttention over the paged cache itself: the pages end to end as one (1, Hkv, pages * page, D) key sequence
    (a view, no copy) under paged_block_mask (built untimed). Not yet run compiled: pages of 16 may be below the KV
    block size FlexAttention's kernel takes (an error row then)."""
    if descales is not None:
        raise Unsupported("FlexAttention takes no FP8 caches")
    flex_attention, create_block_mask = flex()
    block_mask, _ = paged_block_mask(case, q, cu, table, create_block_mask)
    keys, values = (c.flatten(0, 1).transpose(0, 1)[None] for c in (kc, vc))
    return lambda: flex_attention(q.transpose(0, 1)[None], keys, values, block_mask=block_mask,
                                  enable_gqa=True)[0].transpose(0, 1)


PROVIDERS = {
    "fused_attn-serving": _fused,
    "fused_attn-separate": _fused_separate,
    "flash-varlen": _flash_varlen,
    "flex": _flex,
}


def check(name, case, device, cache):
    """The provider on a small step of the same kind (page size, cache type) against the float64 reference."""
    small = Case(40 if case.chunk else 0, 3, 300, case.page, case.kv, 4, 2, 64, case.dtype)
    q, kc, vc, cu, used, table, descales = inputs(small, device)
    kw = dict(seqused_k=used, block_table=table, causal=True, **_descales(descales))
    return common.check(cache, (name, bool(case.chunk), case.page, case.kv),
                        lambda: PROVIDERS[name](small, q, kc, vc, cu, used, table, descales)(),
                        lambda upcast: fused_attn.reference.attention_varlen(
                            q, kc, vc, cu, None, max(small.lens_q), small.cache, upcast=upcast, **kw))


def measure(name, case, device):
    """(status, ms, None): the median time of one step."""
    return common.time_step(lambda: PROVIDERS[name](case, *inputs(case, device)))


def derived(case, name, ms) -> dict:
    return common.bandwidth(case.kv_bytes(), ms)


def label(case) -> str:
    step = f"{case.chunk}+{case.decodes}x1" if case.chunk else f"{case.decodes}x1"
    return f"serving {step:9} cache={case.cache:6} page={case.page:3} kv={case.kv:4} D={case.head_dim}"


def describe(case) -> str:
    return f"{label(case)} {case.kv_bytes() / 2**20:9.1f} MiB of K/V"
