"""Random valid calls across the public surface, drawn by Hypothesis: `attention` (lengths 1..300 both sides, head
dims 1..256 and Dv != D, GQA ratios, both layouts, strided views, causal / windows / unbounded, softcap, ALiBi,
dropout with its replayed mask, fp32 / fp16), `attention_varlen` (sequences of 0..300 rows) and
`attention_with_kvcache` (contiguous and paged) and `flex_attention` (mask functions composed of documents,
windows, prefixes and per-head choices, any block size), each held to the numerics rule against the float64 reference,
forward and (where there is one) backward; a non-finite output fails the rule.

CI runs a fixed budget from a recorded seed (reproducible); FUSED_ATTN_PROPERTY_EXAMPLES=N (a nightly, a GPU run)
multiplies the budget and FUSED_ATTN_PROPERTY_SEED picks another seed. Every failure found becomes a curated case
(tests/test_attention.py, test_varlen.py, test_kvcache.py)."""
import os

import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import fused_attn
from fused_attn.testing import (Case, VarlenCase, _measure, evaluate, evaluate_kvcache, evaluate_varlen, make_inputs,
                                make_kvcache_inputs)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SEED = int(os.environ.get("FUSED_ATTN_PROPERTY_SEED", 20261128))
SCALE = int(os.environ.get("FUSED_ATTN_PROPERTY_EXAMPLES", 1))


def budget(n):
    return settings(max_examples=n * SCALE, deadline=None, database=None, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def windows(draw):
    """(causal, window_size): unbounded, causal, or a window with sides of 0..300 or unbounded."""
    kind = draw(st.sampled_from(["none", "causal", "window"]))
    if kind != "window":
        return kind == "causal", (-1, -1)
    side = st.one_of(st.just(-1), st.integers(0, 300))
    left, right = draw(side), draw(side)
    causal = draw(st.booleans()) and right <= 0
    return causal, (left, 0 if causal else right)


@st.composite
def modifiers(draw, dropout=True):
    return dict(softcap=draw(st.sampled_from([0.0, 0.0, 2.0, 30.0])),
                alibi=draw(st.sampled_from([None, None, "head", "batch"])),
                dropout=draw(st.sampled_from([0.0, 0.0, 0.0, 0.25])) if dropout else 0.0)


@st.composite
def dense_cases(draw):
    seqlen_q, seqlen_k = draw(st.integers(1, 300)), draw(st.integers(1, 300))
    heads_q, heads_kv = draw(st.sampled_from([(1, 1), (2, 1), (3, 1), (2, 2), (4, 2)]))  # MHA, GQA, MQA
    causal, window = windows(draw)
    return Case(batch=draw(st.integers(1, 2)) if seqlen_q * seqlen_k <= 150 * 150 else 1,  # bounded work
                heads_q=heads_q, heads_kv=heads_kv, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
                head_dim=draw(st.integers(1, 256)), head_dim_v=draw(st.one_of(st.none(), st.integers(1, 256))),
                dtype=draw(st.sampled_from([torch.float32, torch.float16])), causal=causal, window=window,
                layout=draw(st.sampled_from(["bhsd", "bshd"])), strided=draw(st.booleans()),
                **draw(modifiers()))


@seed(SEED)
@budget(10)
@given(case=dense_cases(), grad=st.booleans())
def test_attention(case, grad):
    res = evaluate(case, DEVICE, grad=grad)
    assert res.ok, res.describe()


@st.composite
def varlen_cases(draw):
    n = draw(st.integers(1, 3))
    lengths = st.lists(st.integers(0, 300), min_size=n, max_size=n)
    seqlens_q, seqlens_k, tail = draw(lengths), draw(lengths), draw(st.integers(0, 3))
    if not (sum(seqlens_q) and sum(seqlens_k)) and not tail:
        tail = 1  # a packed tensor holds at least one row (empty tensors are refused)
    heads_q, heads_kv = draw(st.sampled_from([(1, 1), (2, 1), (2, 2)]))
    causal, window = windows(draw)
    return VarlenCase(tuple(seqlens_q), tuple(seqlens_k), heads_q, heads_kv, draw(st.integers(1, 256)),
                      draw(st.sampled_from([None, 16, 40])), draw(st.sampled_from([torch.float32, torch.float16])),
                      causal, window, strided=draw(st.booleans()), tail=tail, **draw(modifiers()))


@seed(SEED)
@budget(5)
@given(case=varlen_cases(), grad=st.booleans())
def test_attention_varlen(case, grad):
    res = evaluate_varlen(case, DEVICE, grad=grad)
    assert res.ok, res.describe()


@seed(SEED)
@budget(6)
@given(data=st.data())
def test_attention_with_kvcache(data):
    draw = data.draw
    B, Hkv = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    Hq, D, Sq = Hkv * draw(st.sampled_from([1, 4])), draw(st.integers(1, 256)), draw(st.integers(1, 16))
    page = draw(st.sampled_from([0, 16, 32]))
    s_new = draw(st.integers(0, 4))
    capacity = draw(st.integers(s_new, 300))
    lens = [draw(st.integers(0, capacity - s_new)) for _ in range(B)]
    causal, window = windows(draw)
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    q, kc, vc, table, k, v = make_kvcache_inputs(B, Sq, Hq, Hkv, D, max(capacity, 1), s_new, dtype, DEVICE, page,
                                                 seed=draw(st.integers(0, 99)), dv=draw(st.sampled_from([None, 8])))
    _, metrics = evaluate_kvcache(q, kc, vc, table, k, v, torch.tensor(lens, dtype=torch.int32, device=DEVICE),
                                  num_splits=draw(st.integers(0, 3)), causal=causal, window_size=window,
                                  softcap=draw(st.sampled_from([0.0, 5.0])))
    assert all(m.ok for m in metrics.values()), metrics


@st.composite
def mask_functions(draw, seqlen_k):
    """A mask function composed of random pieces (documents over the keys, a causal window, a prefix, per head)."""
    cuts = sorted(draw(st.lists(st.integers(1, max(1, seqlen_k - 1)), max_size=6)))
    doc = torch.bucketize(torch.arange(max(seqlen_k, 300)), torch.tensor(cuts, dtype=torch.long), right=True)
    doc = doc.to(DEVICE)
    window, prefix = draw(st.integers(1, 300)), draw(st.integers(0, 50))
    per_head, combine = draw(st.booleans()), draw(st.sampled_from(["and", "or"]))

    def mask_mod(b, h, q, kv):
        a = (doc[q] == doc[kv]) & (q >= kv) & (q - kv < window)
        c = kv < prefix
        m = a & ~c if combine == "and" else a | c  # prefix keys hidden, or visible to all
        return m & ((h % 2 == 0) | (kv % 2 == 0)) if per_head else m
    return mask_mod


@seed(SEED)
@budget(5)
@given(data=st.data())
def test_flex_attention(data):
    draw = data.draw
    seqlen_q, seqlen_k = draw(st.integers(1, 200)), draw(st.integers(1, 200))
    heads_q, heads_kv = draw(st.sampled_from([(1, 1), (2, 1), (2, 2)]))
    case = Case(draw(st.integers(1, 2)), heads_q, heads_kv, seqlen_q, seqlen_k, draw(st.integers(1, 128)),
                dtype=draw(st.sampled_from([torch.float32, torch.float16])))
    mask_mod = draw(mask_functions(seqlen_k))
    bm = fused_attn.create_block_mask(mask_mod, None, heads_q, seqlen_q, seqlen_k, DEVICE,
                                      BLOCK_SIZE=draw(st.sampled_from([16, 32, 64, 128])))
    q, k, v, do = make_inputs(case, DEVICE, seed=draw(st.integers(0, 99)))
    out, lse = fused_attn.flex_attention(q, k, v, block_mask=bm, enable_gqa=True, return_lse=True)
    got = dict(out=out, lse=lse, **dict(zip(("dq", "dk", "dv"), torch.autograd.grad(out, (q, k, v), do))))
    res = _measure(case, got, q, k, v, do, True, mods=dict(mask_mod=mask_mod))
    assert res.ok, res.describe()
