"""Serving: packed batches mixing prefill chunks, drafts and decodes against a paged KV cache (attention_varlen with
block_table / seqused_k, flash_attn_varlen_func as vLLM calls it) and write_kv_cache -- against the float64
reference sequence by sequence, bitwise alone vs in a batch, the cache writes against indexing by hand."""
import pytest
import torch

import fused_attn
from fused_attn import kernels, reference
from fused_attn.testing import alibi_slopes, evaluate_serving, make_serving_inputs

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
F16, F32 = torch.float16, torch.float32

# (lens_q, lens_k): a prefill chunk over a cache, a chunk from an empty cache, a draft, decodes (one over no keys),
# an empty sequence
MIXED = ([50, 1, 5, 0, 1, 37, 1], [400, 300, 260, 50, 0, 37, 33])
SMALL = ([20, 1, 3, 0, 1], [150, 130, 70, 9, 0])


def check(q, kc, vc, cu, used, table, **kw):
    before = kernels.launches["decode"]
    (out, lse), metrics = evaluate_serving(q, kc, vc, cu, used, table, **kw)
    assert kernels.launches["decode"] == before + 1
    assert all(m.ok for m in metrics.values()), metrics
    assert out[cu[-1]:].abs().max() == 0 and torch.isneginf(lse[:, cu[-1]:]).all()  # rows of no sequence
    return out, lse


@pytest.mark.parametrize("page, Hq, Hkv, mods", [
    pytest.param(16, 8, 2, dict(causal=True), id="page16-gqa4-causal"),
    pytest.param(256, 6, 2, dict(causal=True, window_size=(40, 0), softcap=20.0), id="page256-gqa3-win40-softcap"),
    pytest.param(32, 4, 4, dict(alibi=True, sinks=True), id="page32-mha-alibi-sinks"),
])
def test_mixed_batch_against_reference(page, Hq, Hkv, mods):
    q, kc, vc, cu, used, table = make_serving_inputs(*MIXED, Hq, Hkv, 32, F16, DEVICE, page)
    kw = {n: v for n, v in mods.items() if n in ("causal", "window_size", "softcap")}
    if mods.get("alibi"):
        kw["alibi_slopes"] = alibi_slopes(Hq, len(MIXED[0]), DEVICE)
    if mods.get("sinks"):
        kw["sinks"] = torch.randn(Hq, device=DEVICE)
    check(q, kc, vc, cu, used, table, **kw)


def test_long_chunk_over_a_long_cache():
    """The issue's extremes: a 300-query chunk over 2,000 keys beside decodes over 2,000 and 1 keys (pages of 256,
    shuffled), causal with a window on the chunk's far keys."""
    q, kc, vc, cu, used, table = make_serving_inputs([300, 1, 1], [2000, 2000, 1], 2, 2, 16, F16, DEVICE, 256)
    check(q, kc, vc, cu, used, table, causal=True, window_size=(1500, 0))


@pytest.mark.parametrize("num_splits", [1, 3])
def test_split_counts_and_bitwise_alone_or_in_a_batch(num_splits):
    """Split counts are exact; a sequence gives bitwise the same result alone and inside the mixed batch."""
    q, kc, vc, cu, used, table = make_serving_inputs(*SMALL, 8, 2, 16, F32, DEVICE, 16, seed=1)
    out, lse = check(q, kc, vc, cu, used, table, causal=True, num_splits=num_splits)
    for b in (0, 2):
        q0, q1 = int(cu[b]), int(cu[b + 1])
        alone, alone_lse = fused_attn.attention_varlen(
            q[q0:q1], kc, vc, cu[b:b + 2] - q0, None, q1 - q0, int(used[b]), seqused_k=used[b:b + 1],
            block_table=table[b:b + 1], causal=True, num_splits=num_splits, return_lse=True)
        assert torch.equal(alone, out[q0:q1]) and torch.equal(alone_lse, lse[:, q0:q1])


def test_flash_attn_2s_paged_call_and_inputs_that_require_grad():
    """FlashAttention-2's paged varlen call gives the key counts as cu_seqlens_k (not seqused_k) and runs the forward
    on inputs that require grad: the same bits as vLLM's call; only a backward that reaches the cache raises."""
    q, kc, vc, cu, used, table = make_serving_inputs(*SMALL, 4, 2, 16, F32, DEVICE, 16, seed=3)
    want = fused_attn.flash_attn_varlen_func(q, kc, vc, cu, None, 20, 150, seqused_k=used, block_table=table,
                                             causal=True)
    cu_k = torch.nn.functional.pad(used.cumsum(0), (1, 0)).to(torch.int32)
    qg = q.clone().requires_grad_()
    got = fused_attn.flash_attn_varlen_func(qg, kc, vc, cu, cu_k, 20, 150, block_table=table, causal=True)
    assert torch.equal(got, want) and got.requires_grad
    with pytest.raises(RuntimeError, match="over a KV cache .* has no backward"):
        got.sum().backward()


def test_seqused_k_with_packed_keys():
    """Contiguous packed keys with seqused_k: sequence b uses rows cu_seqlens_k[b] : + seqused_k[b] (FA3)."""
    g = torch.Generator().manual_seed(2)
    lens_q, lens_k, used = [3, 1, 20], [90, 40, 64], [70, 0, 64]
    q, k, v = (torch.randn(n, h, 24, generator=g).to(DEVICE) for n, h in ((24, 4), (194, 2), (194, 2)))
    cu_q, cu_k = (fused_attn.cu_seqlens(x, DEVICE) for x in (lens_q, lens_k))
    used = torch.tensor(used, dtype=torch.int32, device=DEVICE)
    got = fused_attn.attention_varlen(q, k, v, cu_q, cu_k, 20, 90, seqused_k=used, causal=True)
    want = reference.attention_varlen(q, k, v, cu_q, cu_k, 20, 90, seqused_k=used, causal=True, upcast=torch.float64)
    assert (got.double() - want).abs().max() < 1e-5


def test_flash_attn_varlen_func_as_vllm_calls_it():
    q, kc, vc, cu, used, table = make_serving_inputs(*SMALL, 4, 2, 16, F32, DEVICE, 16, seed=3)
    sinks = torch.randn(4, device=DEVICE)
    out = torch.full((q.shape[0], 4, 16), 7.0, device=DEVICE)
    got, lse = fused_attn.flash_attn_varlen_func(
        q=q, k=kc, v=vc, out=out, cu_seqlens_q=cu, max_seqlen_q=20, seqused_k=used, max_seqlen_k=150,
        softmax_scale=0.3, causal=True, alibi_slopes=None, window_size=(-1, -1), block_table=table, softcap=0.0,
        scheduler_metadata=None, fa_version=3, q_descale=None, k_descale=None, v_descale=None, num_splits=0,
        s_aux=sinks, return_softmax_lse=True)
    want, want_lse = fused_attn.attention_varlen(q, kc, vc, cu, None, 20, 150, seqused_k=used, block_table=table,
                                                 causal=True, scale=0.3, sinks=sinks, return_lse=True)
    assert got is out and torch.equal(out, want) and torch.equal(lse, want_lse)


@pytest.mark.parametrize("cache_dtype", [None, torch.float8_e4m3fn, torch.float8_e5m2], ids=["same", "e4m3", "e5m2"])
def test_write_kv_cache(cache_dtype):
    """Each token lands at its slot (through any page size, here 16 and 24), padding slots (-1) write nothing,
    nothing else changes; FP8 caches hold x / scale rounded as torch rounds it."""
    g = torch.Generator().manual_seed(4)
    for page in (16, 24):
        key, value = (torch.randn(9, 2, d, generator=g).to(DEVICE) * 30 for d in (16, 8))
        dtype = cache_dtype or key.dtype
        k_cache, v_cache = (torch.full((5, page, 2, d), 3.0, device=DEVICE).to(dtype) for d in (16, 8))
        want_k, want_v = k_cache.float().clone(), v_cache.float().clone()
        slots = torch.tensor([5, -1, 0, page * 4 + page - 1, 17, -1, page * 2, 3, 40], device=DEVICE)
        scales = {}
        if cache_dtype is not None:
            scales = dict(k_scale=torch.tensor([0.5, 2.0], device=DEVICE), v_scale=torch.tensor(0.25, device=DEVICE))
        fused_attn.write_kv_cache(key, value, k_cache, v_cache, slots, **scales)
        for t, s in enumerate(slots.tolist()):
            if s >= 0:
                k_t, v_t = key[t], value[t]
                if scales:  # torch's own cast: clamp to the finite range, round to nearest even
                    fmax = torch.finfo(cache_dtype).max
                    k_t = (k_t / scales["k_scale"][:, None]).clamp(-fmax, fmax).to(cache_dtype).float()
                    v_t = (v_t / scales["v_scale"]).clamp(-fmax, fmax).to(cache_dtype).float()
                want_k[s // page, s % page], want_v[s // page, s % page] = k_t, v_t
        assert torch.equal(k_cache.float(), want_k) and torch.equal(v_cache.float(), want_v)


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
def test_fp8_caches(fp8):
    """FP8 caches with per-(sequence, kv head) descales: paged attention_varlen (split and not) and
    attention_with_kvcache appending new keys (quantized as write_kv_cache stores them), against the reference fed
    the dequantized cache; the drop-ins pass k_descale / v_descale through."""
    g = torch.Generator().manual_seed(5)
    q, kc, vc, cu, used, table = make_serving_inputs(*SMALL, 8, 2, 32, F16, DEVICE, 16, seed=5)
    kd, vd = (torch.rand(len(SMALL[0]), 2, generator=g).to(DEVICE) + 0.5 for _ in range(2))
    kc, vc = kc.to(fp8), vc.to(fp8)
    for splits in (1, 3):
        check(q, kc, vc, cu, used, table, causal=True, num_splits=splits, k_descale=kd, v_descale=vd)
    got = fused_attn.flash_attn_varlen_func(q=q, k=kc, v=vc, cu_seqlens_q=cu, max_seqlen_q=20, seqused_k=used,
                                            max_seqlen_k=150, causal=True, block_table=table, k_descale=kd,
                                            v_descale=vd)
    assert torch.equal(got, fused_attn.attention_varlen(q, kc, vc, cu, None, 20, 150, seqused_k=used,
                                                        block_table=table, causal=True, k_descale=kd, v_descale=vd))

    qd, k_new, v_new = (torch.randn(2, 2, *hd, generator=g).to(DEVICE, F16) for hd in ((8, 32), (2, 32), (2, 32)))
    kcache, vcache = (torch.randn(2, 64, 2, 32, generator=g).to(DEVICE, fp8) for _ in range(2))
    lens = torch.tensor([10, 40], dtype=torch.int32, device=DEVICE)
    one = torch.tensor(0.7, device=DEVICE)  # one value for every row and head
    kw = dict(cache_seqlens=lens, causal=True, k_descale=one, v_descale=one, return_lse=True)
    want = reference.attention_with_kvcache(qd, kcache, vcache, k_new, v_new, upcast=torch.float64, **kw)
    pt = reference.attention_with_kvcache(qd, kcache, vcache, k_new, v_new, upcast=None, **kw)
    got = fused_attn.flash_attn_with_kvcache(qd, kcache, vcache, k_new, v_new, cache_seqlens=lens, causal=True,
                                             k_descale=one, v_descale=one, return_softmax_lse=True)
    for x, w, p in zip(got, want, pt):
        assert (x.double() - w).abs().max() <= 2 * (p.double() - w).abs().max() + 1e-3
    written = (k_new[0, 1].double() / 0.7).clamp(-448, 448).to(fp8) if fp8 == torch.float8_e4m3fn else None
    if written is not None:  # the second new key of row 0 sits at position 11, quantized
        assert torch.equal(kcache[0, 11].view(torch.uint8), written.view(torch.uint8))


def test_errors():
    q, kc, vc, cu, used, table = make_serving_inputs([2, 1], [20, 5], 4, 2, 16, F32, DEVICE, 16)
    base = dict(seqused_k=used, block_table=table)
    run = (lambda *a, **kw: fused_attn.attention_varlen(*(a or (q, kc, vc, cu, None, 2, 20)), **{**base, **kw}))
    with pytest.raises(ValueError, match="dropout_p"):
        run(dropout_p=0.1)
    with pytest.raises(ValueError, match="not both"):
        run(q, kc, vc, cu, cu, 2, 20)
    with pytest.raises(ValueError, match="needs seqused_k"):
        run(seqused_k=None)
    with pytest.raises(ValueError, match="multiple of 16"):
        run(q, kc[:, :8], vc[:, :8], cu, None, 2, 20)
    with pytest.raises(ValueError, match="seqused_k 20 must lie in"):
        run(q, kc, vc, cu, None, 2, 19)
    with pytest.raises(ValueError, match="block_table names page"):
        run(block_table=table + 100)
    with pytest.raises(ValueError, match="seqused_k must be int32"):
        run(seqused_k=used.long())
    with pytest.raises(ValueError, match="num_splits"):
        fused_attn.attention_varlen(q[:3], q[:3], q[:3], cu, cu, 2, 2, num_splits=2)
    k8, v8 = kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="need k_descale"):
        run(q, k8, v8, cu, None, 2, 20)
    with pytest.raises(ValueError, match=r"v_descale must be float32 \(B, Hkv\)"):
        run(q, k8, v8, cu, None, 2, 20, k_descale=torch.ones(2, 2, device=DEVICE),
            v_descale=torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="k_descale is for FP8 caches"):
        run(k_descale=torch.ones(2, 2, device=DEVICE), v_descale=torch.ones(2, 2, device=DEVICE))
    with pytest.raises(TypeError, match="k has unsupported dtype"):
        fused_attn.attention(q[None], k8[:1], v8[:1])  # FP8 keys are for caches (the split-KV kernels)
    key = torch.randn(3, 2, 16, device=DEVICE)
    slots = torch.tensor([0, 1, 2], device=DEVICE)
    with pytest.raises(ValueError, match="outside"):
        fused_attn.write_kv_cache(key, key, kc, vc, slots + kc.shape[0] * 16)
    with pytest.raises(ValueError, match="k_scale is for FP8 caches"):
        fused_attn.write_kv_cache(key, key, kc, vc, slots, k_scale=torch.tensor(1.0, device=DEVICE))
    with pytest.raises(TypeError, match="k_scale must be a float32 tensor"):
        fused_attn.write_kv_cache(key, key, kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn), slots)
    with pytest.raises(ValueError, match="do not match"):
        fused_attn.write_kv_cache(key[..., :8], key[..., :8], kc, vc, slots)
