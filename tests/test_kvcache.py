"""KV-cache decoding (attention_with_kvcache, flash_attn_with_kvcache, the split-KV path of attention): against
the reference over each row's valid cache, in-place append, paged == contiguous, every split count, errors."""
import pytest
import torch

import fused_attn
from fused_attn import kernels
from fused_attn.numerics import FACTORS, Metric
from fused_attn.testing import evaluate_kvcache, make_kvcache_inputs

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


def make(B, Sq, Hq, Hkv, D, S_cache, S_new, dtype, page=0, seed=0, dv=None):
    return make_kvcache_inputs(B, Sq, Hq, Hkv, D, S_cache, S_new, dtype, DEVICE, page, seed, dv)


def check(q, kc, vc, table, k, v, seqlens, num_splits=0, **kw):
    """The kernels against the float64 reference (PyTorch in the input dtype as the yardstick); returns out."""
    before = kernels.launches["decode"]
    (out, lse), metrics = evaluate_kvcache(q, kc, vc, table, k, v, seqlens, num_splits, **kw)
    assert kernels.launches["decode"] == before + 1
    assert all(m.ok for m in metrics.values()), metrics
    return out, lse


# (B, Sq, Hq, Hkv, D, S_cache, S_new, cache_seqlens)
SHAPES = [
    # found by tests/test_property.py: one cached key, fp32 -- the lse rounds by one fp32 ulp, and the rule's floor
    # once came out ~0 for a single value that happened to round exactly (the floor is now at least one ulp)
    pytest.param((1, 1, 1, 1, 5, 1, 0, [1]), id="sq1-one-key-d5"),
    pytest.param((3, 1, 16, 2, 64, 150, 0, [0, 37, 150]), id="sq1-gqa8-d64-ragged"),
    pytest.param((2, 4, 4, 1, 128, 96, 3, [5, 93]), id="sq4-mqa-d128-append3"),
    pytest.param((2, 16, 8, 2, 256, 80, 16, [0, 64]), id="sq16-gqa4-d256-append16"),
]
MASKS = [pytest.param((False, (-1, -1)), id="full"), pytest.param((True, (-1, -1)), id="causal"),
         pytest.param((True, (20, -1)), id="causal-win20")]


@pytest.mark.parametrize("paged", [0, 16], ids=["contiguous", "page16"])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("shape", SHAPES)
def test_against_reference(shape, mask, paged):
    B, Sq, Hq, Hkv, D, S, S_new, lens = shape
    causal, window = mask
    q, kc, vc, table, k, v = make(B, Sq, Hq, Hkv, D, S, S_new, F32 if B * Sq * S == 1 else F16, paged)
    check(q, kc.clone(), vc.clone(), table, k, v, torch.tensor(lens, dtype=torch.int32, device=DEVICE),
          causal=causal, window_size=window)


@pytest.mark.parametrize("dtype", [F32] + ([BF16] if ON_GPU else []))
def test_dtypes(dtype):
    q, kc, vc, table, k, v = make(2, 2, 4, 2, 40, 70, 2, dtype, dv=24)
    check(q, kc, vc, table, k, v, torch.tensor([3, 60], dtype=torch.int32, device=DEVICE), causal=True)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7, 0])
def test_every_split_count(num_splits):
    q, kc, vc, table, k, v = make(2, 3, 8, 2, 64, 200, 1, F32)
    check(q, kc, vc, table, k, v, torch.tensor([199, 41], dtype=torch.int32, device=DEVICE), num_splits,
          causal=True)


def test_paged_equals_contiguous():
    """The same keys in a contiguous cache and scattered over pages of 32 give bitwise the same result."""
    q, kc, vc, table, k, v = make(2, 2, 4, 2, 32, 96, 2, F32, page=32)
    lens = torch.tensor([50, 94], dtype=torch.int32, device=DEVICE)
    contiguous = [c[table.long()].flatten(1, 2) for c in (kc, vc)]  # row b's pages in order
    paged = fused_attn.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, block_table=table, num_splits=2)
    dense = fused_attn.attention_with_kvcache(q, *contiguous, k, v, cache_seqlens=lens, num_splits=2)
    assert torch.equal(paged, dense)


@pytest.mark.parametrize("page", [0, 16])
def test_append_writes_only_its_slots(page):
    """Sentinels everywhere else: the new keys land at cache_seqlens[b] .. + S_new - 1, nothing else changes, and
    cache_seqlens is not modified."""
    q, kc, vc, table, k, v = make(3, 2, 4, 2, 16, 48, 2, F32, page)
    kc.fill_(7.0)
    vc.fill_(-7.0)
    before_k, before_v = kc.clone(), vc.clone()
    lens = torch.tensor([0, 13, 46], dtype=torch.int32, device=DEVICE)
    lens_before = lens.clone()
    fused_attn.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, block_table=table)
    assert torch.equal(lens, lens_before)
    for b, n in enumerate(lens.tolist()):
        for i in range(2):
            row = n + i
            if page:
                slot = (table[b, row // page].long(), row % page)
                assert torch.equal(kc[slot], k[b, i]) and torch.equal(vc[slot], v[b, i])
                before_k[slot], before_v[slot] = k[b, i], v[b, i]
            else:
                assert torch.equal(kc[b, row], k[b, i]) and torch.equal(vc[b, row], v[b, i])
                before_k[b, row], before_v[b, row] = k[b, i], v[b, i]
    assert torch.equal(kc, before_k) and torch.equal(vc, before_v)


def test_dense_attention_takes_the_split_path_for_decode_steps():
    """attention() with few query rows and no gradient to compute runs the split-KV kernels (same results)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, s, 64, generator=g).to(DEVICE) for h, s in ((4, 1), (2, 300), (2, 300)))
    want = fused_attn.reference.attention(q, k, v, causal=True, upcast=torch.float64)
    pt = fused_attn.reference.attention(q, k, v, causal=True, upcast=None)
    before = dict(kernels.launches)
    with torch.no_grad():
        out = fused_attn.attention(q, k, v, causal=True)
    assert kernels.launches["decode"] == before.get("decode", 0) + 1 and kernels.launches["fwd"] == before.get("fwd", 0)
    m = Metric.measure(out, want, pt, F32, FACTORS["out"])
    assert m.ok, m
    q.requires_grad_()
    out = fused_attn.attention(q, k, v, causal=True)  # a gradient to come: the regular forward, which saves stats
    assert kernels.launches["fwd"] == before.get("fwd", 0) + 1


def t(*shape, dtype=F16):
    return torch.randn(*shape).to(DEVICE, dtype)


Q, KC = (2, 1, 4, 32), (2, 40, 2, 32)
TABLE = torch.zeros(2, 3, dtype=torch.int32, device=DEVICE)
TRUSTED_ON_GPU = pytest.mark.skipif(ON_GPU, reason="cache_seqlens / block_table values are trusted on a GPU")


@pytest.mark.parametrize("args,kwargs,exc,match", [
    pytest.param((t(2, 4, 32), t(*KC), t(*KC)), {}, ValueError, r"q must be 4-D", id="rank"),
    pytest.param((t(*Q), t(3, 40, 2, 32), t(3, 40, 2, 32)), {}, ValueError, r"B = 2", id="cache-batch"),
    pytest.param((t(*Q), t(*KC), t(2, 41, 2, 32)), {}, ValueError, "must agree", id="kv-cache-shapes"),
    pytest.param((t(*Q), t(*KC), t(*KC), t(2, 1, 2, 32)), {}, ValueError, "given together", id="k-without-v"),
    pytest.param((t(*Q), t(*KC), t(*KC), t(2, 1, 3, 32), t(2, 1, 3, 32)), {}, ValueError, r"\(B, S_new, Hkv, D\)",
                 id="new-heads"),
    pytest.param((t(*Q), t(*KC, dtype=F32), t(*KC, dtype=F32)), {}, TypeError, "share one dtype", id="dtype"),
    pytest.param((t(1, 1, 3, 32), t(1, 40, 2, 32), t(1, 40, 2, 32)), {}, ValueError, r"multiple of key/value heads",
                 id="gqa"),
    pytest.param((t(*Q), t(*KC), t(*KC)), {"cache_seqlens": torch.tensor([1, 2])}, ValueError, "int32", id="seqlens"),
    pytest.param((t(*Q), t(*KC), t(*KC)), {"cache_seqlens": 41}, ValueError, r"row 0: cache_seqlens 41 \+ 0",
                 marks=TRUSTED_ON_GPU, id="seqlens-too-long"),
    pytest.param((t(*Q), t(4, 24, 2, 32), t(4, 24, 2, 32)), {"block_table": TABLE}, ValueError,
                 "multiple of 16, got 24", id="page-size"),
    pytest.param((t(*Q), t(4, 16, 2, 32), t(4, 16, 2, 32)), {"block_table": TABLE + 4, "cache_seqlens": 3},
                 ValueError, "names page 4", marks=TRUSTED_ON_GPU, id="page-missing"),
    pytest.param((t(*Q), t(4, 16, 2, 32), t(4, 16, 2, 32)), {"block_table": TABLE.long()}, ValueError,
                 "int32", id="table-dtype"),
    pytest.param((t(*Q), t(*KC), t(*KC)), {"num_splits": -1}, ValueError, "num_splits", id="splits"),
    pytest.param((t(*Q).requires_grad_(), t(*KC), t(*KC)), {}, ValueError, "inference only: q requires grad",
                 id="requires-grad"),
    pytest.param((t(*Q), t(*KC), t(*KC)), {"window_size": (-3, 0)}, ValueError, "left must be >= -1", id="window"),
])
def test_invalid_inputs(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fused_attn.attention_with_kvcache(*args, **kwargs)


def test_flash_attn_with_kvcache_dropin():
    q, kc, vc, table, k, v = make(2, 1, 4, 2, 32, 64, 1, F32, page=16)
    lens = torch.tensor([10, 62], dtype=torch.int32, device=DEVICE)
    kc2, vc2 = kc.clone(), vc.clone()
    out, lse = fused_attn.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, block_table=table, causal=True,
                                                  window_size=torch.tensor([7, 3]), return_softmax_lse=True)
    want, want_lse = fused_attn.attention_with_kvcache(q, kc2, vc2, k, v, cache_seqlens=lens, block_table=table,
                                                       causal=True, window_size=(7, 0), return_lse=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse) and torch.equal(kc, kc2)
    slopes = torch.rand(4, device=DEVICE)
    out = fused_attn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, block_table=table, softcap=5.0,
                                             alibi_slopes=slopes)
    assert torch.equal(out, fused_attn.attention_with_kvcache(q, kc, vc, cache_seqlens=lens, block_table=table,
                                                              softcap=5.0, alibi_slopes=slopes))
    for name, value in (("cache_batch_idx", lens), ("cache_leftpad", lens)):  # contiguous caches only
        with pytest.raises(ValueError, match=f"{name} takes a contiguous cache"):
            fused_attn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, block_table=table, **{name: value})


@pytest.mark.parametrize("interleaved,causal,batch_idx,leftpad", [
    pytest.param(True, True, False, False, id="rotary-gptj-causal"),
    pytest.param(False, False, True, False, id="rotary-neox-noncausal-batch-idx"),
    pytest.param(False, True, True, True, id="rotary-neox-causal-batch-idx-leftpad"),
    pytest.param(None, True, False, True, id="leftpad"),
])
def test_flash_attn_kvcache_rotary_batch_idx_leftpad(interleaved, causal, batch_idx, leftpad):
    """FlashAttention-2's rotary_cos / rotary_sin (GPT-J pairs or GPT-NeoX halves, rotary_dim < D), cache_batch_idx
    (a cache of 5 rows, 3 used in shuffled order) and cache_leftpad, against the reference (its rotary computed as
    complex products in float64): out, lse, and the cache rows written (rotated keys, at the right rows and
    positions; nothing else changed)."""
    g = torch.Generator().manual_seed(4)
    B, Sq, S_new, Hq, Hkv, D, S = 3, 2, 2, 4, 2, 32, 64
    rnd = (lambda *shape: torch.randn(*shape, generator=g).to(DEVICE))
    q, k, v = rnd(B, Sq, Hq, D), rnd(B, S_new, Hkv, D), rnd(B, S_new, Hkv, D)
    rows = 5 if batch_idx else B
    kc, vc = rnd(rows, S, Hkv, D), rnd(rows, S, Hkv, D)
    lens = torch.tensor([40, 0, 61], dtype=torch.int32, device=DEVICE)
    idx = torch.tensor([3, 0, 4], dtype=torch.int32, device=DEVICE) if batch_idx else None
    pad = torch.tensor([7, 0, 30], dtype=torch.int32, device=DEVICE) if leftpad else None
    kw = dict(cache_seqlens=lens, causal=causal, cache_batch_idx=idx, cache_leftpad=pad)
    if interleaved is not None:
        angle = torch.rand(S + 4, 12, generator=g).to(DEVICE) * 6.3
        kw.update(rotary_cos=angle.cos(), rotary_sin=angle.sin(), rotary_interleaved=interleaved)
    want, want_lse = fused_attn.reference.attention_with_kvcache(q, kc, vc, k, v, return_lse=True,
                                                                 upcast=torch.float64, **kw)
    kc2, vc2 = kc.clone(), vc.clone()
    out, lse = fused_attn.flash_attn_with_kvcache(q, kc, vc, k, v, return_softmax_lse=True, **kw)
    assert (out - want).abs().max() < 1e-5 and (lse - want_lse).abs().max() < 1e-5
    written = kc2.clone()
    for b, r in enumerate(idx.tolist() if batch_idx else range(B)):
        n = int(lens[b])
        new_k = k[b] if interleaved is None else fused_attn.reference._rotated(
            k[b], kw["rotary_cos"], kw["rotary_sin"], n, n, interleaved)
        written[r, n:n + S_new] = new_k
        vc2[r, n:n + S_new] = v[b]
    assert (kc - written).abs().max() < 1e-6 and torch.equal(vc, vc2)


def test_opcheck_decode():
    from fused_attn import ops
    q, kc, vc, table, _, _ = make(2, 2, 4, 2, 32, 64, 0, F32, page=16)
    lens = torch.tensor([10, 62], dtype=torch.int32, device=DEVICE)
    kv = (lambda t: t.transpose(1, 2))
    torch.library.opcheck(ops.decode, (kv(q), kv(kc), kv(vc), 0.2, 0, -1, 0),
                          dict(seqlens_k=lens, block_table=table, page_size=16, num_splits=2, layout="bshd"))


def test_combine_kernel_agrees_with_merge_attention():
    """The split kernels' combine step and merge_attention are the same formula: a split run equals merging the
    unsplit results over the same key ranges (within fp32 rounding)."""
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 2, s, 32, generator=g).to(DEVICE) for s in (3, 128, 128))
    lens = None
    out = torch.empty(1, 2, 3, 32, device=DEVICE)
    lse = torch.empty(1, 2, 3, device=DEVICE)
    kernels.attention_decode(q, k, v, out, lse, lens, None, 0, 128, 32 ** -0.5, -1, -1, 4)
    block = 128 // 4
    parts = [fused_attn.attention(q, k[:, :, i:i + block], v[:, :, i:i + block], return_lse=True)
             for i in range(0, 128, block)]
    m_out, m_lse = fused_attn.merge_attention([p[0] for p in parts], [p[1] for p in parts])
    torch.testing.assert_close(out, m_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, m_lse, rtol=1e-5, atol=1e-6)
