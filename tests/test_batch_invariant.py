"""The batch-invariant mode (fused_attn.set_batch_invariant_mode): a row's bits, compared with torch.equal, do not
depend on its batch, its position in a packed batch, how its queries are chunked, the cache layout, num_splits,
GQA vs MHA with repeated keys, or whether the inputs require grad. One 200-token sequence (split size 64: four
splits, key tiles of 32 under the interpreter) is computed by every entry point and every path; each result must
equal the mode's single prefill call row for row. And the default mode is shown NOT to have the property in the
same comparisons, so these tests cannot pass vacuously."""
import pytest
import torch

import fused_attn
from fused_attn import batch_invariant

S, HQ, HKV, D = 200, 2, 1, 16
SPLIT = 64
MODS = {  # modifier sets switched on, each also in the serving and decode calls
    "plain": dict(causal=True),
    "window-softcap-alibi-sinks": dict(causal=True, window_size=(90, 0), softcap=20.0, sinks=True, alibi=True),
}


def _rand(*shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.fixture(autouse=True)
def mode():
    """Every test starts in the default mode and leaves the mode as it found it."""
    with fused_attn.set_batch_invariant_mode(False):
        yield


def _kw(mods: dict, device):
    """The keyword arguments of the calls for a modifier set."""
    kw = {k: v for k, v in mods.items() if k not in ("sinks", "alibi")}
    if mods.get("sinks"):
        kw["sinks"] = torch.tensor([0.5, 2.0], device=device)
    if mods.get("alibi"):
        kw["alibi_slopes"] = fused_attn.reference.alibi_slopes(HQ, device=device)
    return kw


class Sequence:
    """q (S, Hq, D), k / v (S, Hkv, D) of one sequence, and paged copies of its keys: pages of `page` keys among
    other sequences' pages, in shuffled order."""

    def __init__(self, dtype, device, seed=0):
        self.dtype, self.device = dtype, device
        self.q = _rand(S, HQ, D, dtype=dtype, seed=seed).to(device)
        self.k = _rand(S, HKV, D, dtype=dtype, seed=seed + 1).to(device)
        self.v = _rand(S, HKV, D, dtype=dtype, seed=seed + 2).to(device)

    def pages(self, page: int, rows: int = 1, seed: int = 3):
        """(k_pages, v_pages, block_table (rows, n)): the sequence's keys in pages, every row of the table naming
        them (more pages than it uses, holding noise, in between)."""
        n = -(-S // page)
        pool = 2 * n + 1
        order = torch.randperm(pool, generator=torch.Generator().manual_seed(seed))[:n]
        k_pages = _rand(pool, page, HKV, D, dtype=self.dtype, seed=seed + 1).to(self.device)
        v_pages = _rand(pool, page, HKV, D, dtype=self.dtype, seed=seed + 2).to(self.device)
        pad = n * page - S
        for dst, src in ((k_pages, self.k), (v_pages, self.v)):
            dst[order] = torch.cat([src, src.new_zeros(pad, HKV, D)]).view(n, page, HKV, D)
        table = order.to(torch.int32)[None].expand(rows, -1).contiguous().to(self.device)
        return k_pages, v_pages, table


def prefill(x: Sequence, **kw):
    """The mode's reference: the whole sequence in one attention() call -> out (S, Hq, D), lse (Hq, S)."""
    out, lse = fused_attn.attention(x.q[None], x.k[None], x.v[None], layout="bshd", return_lse=True, **kw)
    return out[0], lse[0]


def serving_chunks(x: Sequence, chunk: int, page: int = 16, only=None, **kw):
    """Chunked prefill: every chunk of `chunk` queries (or those starting at `only`) a sequence of its own in one
    packed serving call over the paged cache (chunk c sees keys [0, end of c)) -> out, lse of those rows."""
    k_pages, v_pages, _ = x.pages(page)
    starts = list(range(0, S, chunk)) if only is None else list(only)
    ends = [min(s + chunk, S) for s in starts]
    _, _, table = x.pages(page, rows=len(starts))
    cu = fused_attn.cu_seqlens([e - s for s, e in zip(starts, ends)], x.device)
    used = torch.tensor(ends, dtype=torch.int32, device=x.device)
    q = torch.cat([x.q[s:e] for s, e in zip(starts, ends)])
    return fused_attn.attention_varlen(q, k_pages, v_pages, cu, None, chunk, S, seqused_k=used, block_table=table,
                                       return_lse=True, **kw)


def prefill_in_calls(x: Sequence, chunk: int, **kw):
    """Chunked prefill as a server runs it: one attention_with_kvcache call per chunk, each appending its keys to
    the cache first -> out (S, Hq, D), lse (Hq, S)."""
    caches = [t.new_zeros(1, S, HKV, D) for t in (x.k, x.v)]
    outs, lses = [], []
    for s in range(0, S, chunk):
        e = min(s + chunk, S)
        out, lse = fused_attn.attention_with_kvcache(x.q[None, s:e], *caches, x.k[None, s:e], x.v[None, s:e],
                                                     cache_seqlens=s, return_lse=True, **kw)
        outs.append(out[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, 1)


def decode_steps(x: Sequence, positions, page=None, **kw):
    """Token-by-token decoding: query i against the cache's first i + 1 keys, every position a batch row of one
    attention_with_kvcache call (contiguous cache, or paged) -> out (n, Hq, D), lse (Hq, n)."""
    n = len(positions)
    seqlens = torch.tensor([p + 1 for p in positions], dtype=torch.int32, device=x.device)
    q = x.q[list(positions)][:, None]
    if page is None:
        caches = [t[None].expand(n, -1, -1, -1).contiguous() for t in (x.k, x.v)]
        out, lse = fused_attn.attention_with_kvcache(q, *caches, cache_seqlens=seqlens, return_lse=True, **kw)
    else:
        k_pages, v_pages, table = x.pages(page, rows=n)
        out, lse = fused_attn.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=seqlens, block_table=table,
                                                     return_lse=True, **kw)
    return out[:, 0], lse[:, :, 0].transpose(0, 1)


def assert_rows(got, want, rows=slice(None), what=""):
    out, lse = got
    want_out, want_lse = want
    assert torch.equal(out, want_out[rows]), f"{what}: out differs in {int((out != want_out[rows]).sum())} values"
    assert torch.equal(lse, want_lse[:, rows]), f"{what}: lse differs"


STEPS = [0, 31, 63, 64, 127, 128, 150, 199]  # each side of the split boundaries


@pytest.mark.parametrize("dtype, mods", [pytest.param(torch.float32, "plain", id="fp32-plain"),
                                         pytest.param(torch.float16, "window-softcap-alibi-sinks", id="fp16-mods"),
                                         pytest.param(torch.bfloat16, "window-softcap-alibi-sinks", id="bf16-mods")])
def test_prefill_chunks_decode_and_training_agree(dtype, mods, device):
    """One prefill call, chunked prefill (chunks of 1, 7 and 64; packed in one serving call, or one call per chunk
    appending to the cache), token-by-token decode (contiguous and paged caches) and the training forward (inputs
    that require grad) give every row the same bits."""
    x = Sequence(dtype, device)
    kw = _kw(MODS[mods], device)
    with fused_attn.set_batch_invariant_mode(split_size=SPLIT):
        want = prefill(x, **kw)
        assert_rows(serving_chunks(x, 1, only=STEPS, **kw), want, STEPS, "chunks of 1")
        assert_rows(serving_chunks(x, 7, **kw), want, what="chunks of 7")
        assert_rows(prefill_in_calls(x, 64, **kw), want, what="chunks of 64, a call each")
        assert_rows(decode_steps(x, STEPS, **kw), want, STEPS, "decode, contiguous cache")
        assert_rows(decode_steps(x, STEPS, page=64, **kw), want, STEPS, "decode, pages of 64")
        q, k, v = (t[None].clone().requires_grad_() for t in (x.q, x.k, x.v))
        out, lse = fused_attn.attention(q, k, v, layout="bshd", return_lse=True, **kw)
        assert_rows((out[0].detach(), lse[0].detach()), want, what="training forward")
    ref = fused_attn.reference.attention(x.q[None], x.k[None], x.v[None], layout="bshd", upcast=torch.float64,
                                         **kw)[0]
    assert (want[0].double() - ref).abs().max() < (1e-5 if dtype == torch.float32 else 2e-2)  # and still right


BATCH2, BATCH32 = [310], [5 + 37 * i % 300 for i in range(31)]


@pytest.mark.parametrize("others, layout", [pytest.param(BATCH2, None, id="batch2-contiguous"),
                                            pytest.param(BATCH2, 256, id="batch2-pages256"),
                                            pytest.param(BATCH32, 16, id="batch32-pages16"),
                                            pytest.param(BATCH32, 64, id="batch32-pages64")])
def test_decode_alone_or_in_any_batch(others, layout, device):
    """The sequence's last query decoded alone and beside other sequences of very different lengths (in the batch's
    middle), over contiguous caches and pages of 16 / 64 / 256, with num_splits 0 .. 3: the same bits."""
    x = Sequence(torch.float16, device, seed=7)
    cap = 320
    lens = others[: len(others) // 2] + [S] + others[len(others) // 2:]
    me = len(others) // 2
    q = _rand(len(lens), 1, HQ, D, dtype=x.dtype, seed=8).to(device)
    q[me, 0] = x.q[-1]
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    if layout is None:
        caches = [_rand(len(lens), cap, HKV, D, dtype=x.dtype, seed=s).to(device) for s in (9, 10)]
        caches[0][me, :S], caches[1][me, :S] = x.k, x.v
        extra = {}
    else:
        n = -(-cap // layout)
        caches = [_rand(len(lens) * n, layout, HKV, D, dtype=x.dtype, seed=s).to(device) for s in (9, 10)]
        table = torch.randperm(len(lens) * n, generator=torch.Generator().manual_seed(11)).view(len(lens), n)
        mine = table[me, : -(-S // layout)]
        pad = len(mine) * layout - S
        for dst, src in zip(caches, (x.k, x.v)):
            dst[mine] = torch.cat([src, src.new_zeros(pad, HKV, D)]).view(len(mine), layout, HKV, D)
        extra = dict(block_table=table.to(device, torch.int32))
    with fused_attn.set_batch_invariant_mode(split_size=SPLIT):
        alone = fused_attn.attention_with_kvcache(x.q[None, -1:], x.k[None], x.v[None], causal=True, return_lse=True)
        for num_splits in range(4) if len(others) == 1 else (0,):
            out, lse = fused_attn.attention_with_kvcache(q, *caches, cache_seqlens=seqlens, causal=True,
                                                         num_splits=num_splits, return_lse=True, **extra)
            assert torch.equal(out[me], alone[0][0]) and torch.equal(lse[me], alone[1][0]), num_splits


def test_packed_position_and_gqa(device):
    """First or last in a packed batch (attention_varlen, no cache), and GQA vs MHA with the keys repeated: the
    same bits."""
    x = Sequence(torch.float32, device, seed=12)
    other = Sequence(torch.float32, device, seed=13)
    with fused_attn.set_batch_invariant_mode(split_size=SPLIT):
        want = prefill(x, causal=True)
        for first in (True, False):
            q, k, v = (torch.cat([a, b[:77]] if first else [b[:77], a]) for a, b in
                       ((x.q, other.q), (x.k, other.k), (x.v, other.v)))
            cu = fused_attn.cu_seqlens([S, 77] if first else [77, S], device)
            out, lse = fused_attn.attention_varlen(q, k, v, cu, cu, S, S, causal=True, return_lse=True)
            rows = slice(0, S) if first else slice(77, 77 + S)
            assert_rows((out[rows], lse[:, rows]), want, what=f"packed, first={first}")
        group = HQ // HKV
        mha = fused_attn.attention(x.q[None], *(t[None].repeat_interleave(group, 2) for t in (x.k, x.v)),
                                   layout="bshd", causal=True, return_lse=True)
        assert_rows((mha[0][0], mha[1][0]), want, what="MHA with repeated keys")
        steps = decode_steps(x, STEPS, causal=True)
        mha_x = Sequence(torch.float32, device, seed=12)
        mha_x.k, mha_x.v = (t.repeat_interleave(group, 1) for t in (x.k, x.v))
        assert_rows(decode_steps(mha_x, STEPS, causal=True), steps, what="decode, MHA with repeated keys")


def test_block_mask_and_drop_ins(device):
    """flex_attention with a block mask, alone and in a batch, and for a chunk of the queries; flex_attention
    without one, the SDPA and FlashAttention drop-ins against the mode's prefill rows."""
    x = Sequence(torch.float32, device, seed=14)
    other = Sequence(torch.float32, device, seed=15)

    def mask_fn(offset):
        return lambda b, h, q_idx, kv_idx: (q_idx + offset >= kv_idx) & (q_idx + offset - kv_idx < 120)

    bhsd = (lambda t: t[None].transpose(1, 2))
    with fused_attn.set_batch_invariant_mode(split_size=SPLIT):
        want = prefill(x, causal=True)
        mask = fused_attn.create_block_mask(mask_fn(0), None, None, S, S, BLOCK_SIZE=32)
        alone = fused_attn.flex_attention(bhsd(x.q), bhsd(x.k), bhsd(x.v), block_mask=mask, enable_gqa=True)
        batch = [torch.cat([bhsd(o), bhsd(a)]) for o, a in ((other.q, x.q), (other.k, x.k), (other.v, x.v))]
        assert torch.equal(fused_attn.flex_attention(*batch, block_mask=mask, enable_gqa=True)[1], alone[0])
        chunk = fused_attn.create_block_mask(mask_fn(136), None, None, 64, S, BLOCK_SIZE=32)
        part = fused_attn.flex_attention(bhsd(x.q[136:]), bhsd(x.k), bhsd(x.v), block_mask=chunk, enable_gqa=True)
        assert torch.equal(part[0], alone[0][:, 136:])

        flex = fused_attn.flex_attention(bhsd(x.q), bhsd(x.k), bhsd(x.v), enable_gqa=True)  # no mask: every key
        caches = [t[None].expand(len(STEPS), -1, -1, -1).contiguous() for t in (x.k, x.v)]
        assert torch.equal(fused_attn.attention_with_kvcache(x.q[STEPS][:, None], *caches)[:, 0],
                           flex[0].transpose(0, 1)[STEPS])
        sdpa = fused_attn.scaled_dot_product_attention(bhsd(x.q), bhsd(x.k), bhsd(x.v), is_causal=True,
                                                       enable_gqa=True)
        assert torch.equal(sdpa[0].transpose(0, 1), want[0])
        fa = fused_attn.flash_attn_func(x.q[None], x.k[None], x.v[None], causal=True)
        assert torch.equal(fa[0], want[0])
        cu = fused_attn.cu_seqlens([S], device)
        fa_var = fused_attn.flash_attn_varlen_func(x.q, x.k, x.v, cu, cu, S, S, causal=True)
        assert torch.equal(fa_var, want[0])
        steps = decode_steps(x, STEPS, causal=True)
        seqlens = torch.tensor([p + 1 for p in STEPS], dtype=torch.int32, device=device)
        fa_kv = fused_attn.flash_attn_with_kvcache(x.q[STEPS][:, None], *caches, cache_seqlens=seqlens, causal=True)
        assert torch.equal(fa_kv[:, 0], steps[0])


def test_default_mode_is_not_invariant(device):
    """Outside the mode the same comparisons fail: split decode steps merge their ranges in another order than the
    single-pass prefill, and a long sequence decoded alone splits (the plan follows the batch) where inside a full
    batch it does not."""
    x = Sequence(torch.float32, device)
    want = prefill(x, causal=True)
    steps = decode_steps(x, STEPS[2:], num_splits=3, causal=True)
    assert not torch.equal(steps[0], want[0][STEPS[2:]])
    with fused_attn.set_batch_invariant_mode(split_size=SPLIT):
        assert_rows(decode_steps(x, STEPS[2:], num_splits=3, causal=True), prefill(x, causal=True), STEPS[2:])

    long_k, long_v = (_rand(1, 320, HKV, D, dtype=torch.float32, seed=s).to(device) for s in (20, 21))
    q = x.q[None, -1:]
    alone = fused_attn.attention_with_kvcache(q, long_k, long_v)
    batch = [t.expand(40, *t.shape[1:]).contiguous() for t in (q, long_k, long_v)]
    assert not torch.equal(fused_attn.attention_with_kvcache(*batch)[0], alone[0])


def test_backward_in_the_mode(device):
    """The mode's training forward keeps a deterministic backward whose gradients are the default mode's up to
    rounding (the stats the backward reads are merged across the splits too), sinks and softcap included."""
    x = Sequence(torch.float32, device, seed=16)
    kw = _kw(MODS["window-softcap-alibi-sinks"], device)
    kw["sinks"].requires_grad_()
    w = _rand(1, S, HQ, D, dtype=torch.float32, seed=17).to(device)

    def grads():
        q, k, v = (t[None].clone().requires_grad_() for t in (x.q, x.k, x.v))
        out = fused_attn.attention(q, k, v, layout="bshd", **kw)
        return torch.autograd.grad((out * w).sum(), (q, k, v, kw["sinks"]))

    default = grads()
    with fused_attn.set_batch_invariant_mode(split_size=SPLIT):
        first, second = grads(), grads()
    for a, b, d in zip(first, second, default):
        assert torch.equal(a, b)
        assert (a - d).abs().max() <= 1e-5 * d.abs().max()


def test_mode_api(monkeypatch):
    assert not fused_attn.is_batch_invariant_mode()
    with fused_attn.set_batch_invariant_mode(split_size=128):
        assert fused_attn.is_batch_invariant_mode() and batch_invariant.split_keys() == 128
        with fused_attn.set_batch_invariant_mode(False):
            assert batch_invariant.split_keys() == 0
        assert batch_invariant.split_keys() == 128
    assert not fused_attn.is_batch_invariant_mode()
    fused_attn.set_batch_invariant_mode()  # a plain call: on until changed (the fixture restores the mode)
    assert batch_invariant.split_keys() == batch_invariant.DEFAULT_SPLIT_SIZE
    for bad in (0, 17, -16, True, "64", 64.0):
        with pytest.raises(ValueError, match="split_size"):
            fused_attn.set_batch_invariant_mode(split_size=bad)
    with pytest.raises(TypeError, match="enabled"):
        fused_attn.set_batch_invariant_mode(1)
    monkeypatch.setattr(batch_invariant, "_state", None)
    monkeypatch.setenv("FUSED_ATTN_BATCH_INVARIANT", "1")
    assert fused_attn.is_batch_invariant_mode()
    monkeypatch.setattr(batch_invariant, "_state", None)
    monkeypatch.setenv("FUSED_ATTN_BATCH_INVARIANT", "yes please")
    with pytest.raises(ValueError, match="FUSED_ATTN_BATCH_INVARIANT"):
        fused_attn.is_batch_invariant_mode()
    monkeypatch.setattr(batch_invariant, "_state", (False, batch_invariant.DEFAULT_SPLIT_SIZE))


def test_scheduler_metadata_follows_the_mode(device):
    """A plan made in the mode holds its splits (and gives the same bits as no plan); one made outside it is refused
    inside it, by name."""
    x = Sequence(torch.float32, device, seed=18)
    seqlens = torch.tensor([p + 1 for p in STEPS], dtype=torch.int32, device=device)
    caches = [t[None].expand(len(STEPS), -1, -1, -1).contiguous() for t in (x.k, x.v)]
    q = x.q[STEPS][:, None]
    meta_args = (len(STEPS), 1, S, HQ, HKV, D, seqlens)
    outside = fused_attn.get_scheduler_metadata(*meta_args, qkv_dtype=torch.float32)
    with fused_attn.set_batch_invariant_mode(split_size=SPLIT):
        meta = fused_attn.get_scheduler_metadata(*meta_args, qkv_dtype=torch.float32, num_splits=1)
        assert meta.split_keys == SPLIT and meta.plan.splits == -(-S // SPLIT)
        planned = fused_attn.attention_with_kvcache(q, *caches, cache_seqlens=seqlens, causal=True,
                                                    scheduler_metadata=meta)
        assert torch.equal(planned, fused_attn.attention_with_kvcache(q, *caches, cache_seqlens=seqlens, causal=True))
        with pytest.raises(ValueError, match="split_keys"):
            fused_attn.attention_with_kvcache(q, *caches, cache_seqlens=seqlens, scheduler_metadata=outside)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="on a GPU: the real tiles, MMAs and default split size")
def test_long_sequence_on_the_gpu():
    """bf16, D = 128, GQA 8, a 5,000-token sequence (three splits of the default 2,048 keys): the prefill forward,
    the training forward, chunked prefill (chunks of 512, one serving call over pages of 256), and decode steps
    alone, in a batch of 32 and over pages of 16 -- bitwise equal row for row."""
    n, hq, hkv, d = 5000, 16, 2, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(n, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for h in (hq, hkv, hkv))
    with fused_attn.set_batch_invariant_mode():
        out, lse = fused_attn.attention(q[None], k[None], v[None], layout="bshd", causal=True, return_lse=True)
        out, lse = out[0], lse[0]
        train = fused_attn.attention(*(t[None].clone().requires_grad_() for t in (q, k, v)), layout="bshd",
                                     causal=True)
        assert torch.equal(train[0].detach(), out)
        page = 256
        pages = -(-n // page)
        kp, vp = (torch.cat([t, t.new_zeros(pages * page - n, hkv, d)]).view(pages, page, hkv, d) for t in (k, v))
        starts = list(range(0, n, 512))
        ends = [min(s + 512, n) for s in starts]
        table = torch.arange(pages, device="cuda", dtype=torch.int32)[None].expand(len(starts), -1).contiguous()
        chunks = fused_attn.attention_varlen(q, kp, vp, fused_attn.cu_seqlens([e - s for s, e in zip(starts, ends)],
                                                                             "cuda"), None, 512, n,
                                             seqused_k=torch.tensor(ends, dtype=torch.int32, device="cuda"),
                                             block_table=table, causal=True, return_lse=True)
        assert torch.equal(chunks[0], out) and torch.equal(chunks[1], lse)
        steps = [0, 2047, 2048, 4095, 4096, 4999]
        for rows in [[s] for s in steps] + [(steps * 6)[:32]]:  # each step alone, then 32 in one batch
            rows = torch.tensor(rows, device="cuda")
            kc, vc = (t[None].expand(len(rows), -1, -1, -1).contiguous() for t in (k, v))
            got = fused_attn.attention_with_kvcache(q[rows][:, None], kc, vc, cache_seqlens=(rows + 1).int(),
                                                    causal=True)
            assert torch.equal(got[:, 0], out[rows]), rows
        p16 = -(-n // 16)
        k16, v16 = (torch.cat([t, t.new_zeros(p16 * 16 - n, hkv, d)]).view(p16, 16, hkv, d) for t in (k, v))
        rows = torch.tensor(steps, device="cuda")
        table = torch.arange(p16, device="cuda", dtype=torch.int32)[None].expand(len(steps), -1).contiguous()
        got = fused_attn.attention_with_kvcache(q[rows][:, None], k16, v16, cache_seqlens=(rows + 1).int(),
                                                block_table=table, causal=True)
        assert torch.equal(got[:, 0], out[rows])


def test_fp8_cache_alone_batched_and_paged(device):
    """An FP8 (e4m3) cache with its descales: the sequence's decode steps alone and beside another sequence (with
    other descales), contiguous and in pages of 16: the same bits (the descales act per split, before the merge)."""
    x = Sequence(torch.float16, device, seed=23)
    k8, kd = fused_attn.quantize_fp8(x.k[None], dim=2)
    v8, vd = fused_attn.quantize_fp8(x.v[None], dim=2)
    other_k8, other_kd = fused_attn.quantize_fp8(4 * x.k[None].flip(1), dim=2)
    rows = [63, 64, 150, 199]
    seqlens = torch.tensor([p + 1 for p in rows], dtype=torch.int32, device=device)
    with fused_attn.set_batch_invariant_mode(split_size=SPLIT):
        alone = fused_attn.attention_with_kvcache(x.q[rows][:, None], k8.expand(len(rows), -1, -1, -1).contiguous(),
                                                  v8.expand(len(rows), -1, -1, -1).contiguous(), causal=True,
                                                  cache_seqlens=seqlens, k_descale=kd.expand(len(rows), -1),
                                                  v_descale=vd.expand(len(rows), -1), return_lse=True)
        both = fused_attn.attention_with_kvcache(
            torch.cat([x.q[None, -1:], x.q[None, :1]]), torch.cat([k8, other_k8]), torch.cat([v8, other_k8]),
            causal=True, k_descale=torch.cat([kd, other_kd]), v_descale=torch.cat([vd, other_kd]), return_lse=True)
        assert torch.equal(both[0][0, 0], alone[0][-1, 0]) and torch.equal(both[1][0, :, 0], alone[1][-1, :, 0])
        n = -(-S // 16)
        pages = [torch.cat([t[0], t.new_zeros(n * 16 - S, HKV, D)]).view(n, 16, HKV, D) for t in (k8, v8)]
        table = torch.arange(n, dtype=torch.int32, device=device)[None].expand(len(rows), -1).contiguous()
        paged = fused_attn.attention_with_kvcache(x.q[rows][:, None], *pages, cache_seqlens=seqlens, causal=True,
                                                  block_table=table, k_descale=kd.expand(len(rows), -1),
                                                  v_descale=vd.expand(len(rows), -1))
        assert torch.equal(paged, alone[0])
