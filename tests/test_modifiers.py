"""Score modifiers and dropout (softcap, ALiBi, dropout_p) in the kernels, forward and backward: against the float64
reference under FlashAttention's rule, dropout through the public keep-mask; the random stream's contract; the
split-KV and packed entry points; invalid values."""
import pytest
import torch

import fused_attn
from fused_attn import kernels
from fused_attn.function import rng_state, set_rng_state
from fused_attn.testing import Case, VarlenCase, alibi_slopes, evaluate, evaluate_varlen, make_inputs

ON_GPU = torch.cuda.is_available()
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


def check(case, device, grad=True):
    res = evaluate(case, device, grad=grad)
    assert res.launches.get("fwd") == 1 and res.launches.get("bwd", 0) == (1 if grad else 0), res.launches
    assert res.ok, res.describe()
    return res


# (batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, head_dim_v), mask (causal, window), modifiers
CASES = [
    pytest.param((1, 2, 2, 113, 203, 64, 64), (False, (-1, -1)), dict(softcap=1.0), id="cap1-full"),
    pytest.param((1, 4, 2, 203, 113, 40, 40), (True, (-1, -1)), dict(softcap=50.0), id="cap50-causal-gqa"),
    pytest.param((2, 2, 1, 97, 64, 128, 64), (False, (16, 8)), dict(softcap=5.0), id="cap5-win16-8-dv64"),
    pytest.param((1, 2, 2, 113, 203, 64, 64), (True, (-1, -1)), dict(alibi="head"), id="alibi-causal"),
    pytest.param((2, 4, 1, 65, 130, 80, 80), (False, (-1, -1)), dict(alibi="batch"), id="alibi-batch-full-mqa"),
    pytest.param((1, 2, 2, 150, 91, 96, 96), (True, (30, -1)), dict(alibi="head"), id="alibi-causal-win30-sq>sk"),
    pytest.param((1, 2, 2, 113, 203, 64, 64), (False, (-1, -1)), dict(dropout=0.17), id="drop-full"),
    pytest.param((2, 4, 2, 100, 100, 32, 48), (True, (-1, -1)), dict(dropout=0.5), id="drop0.5-causal-gqa-dv48"),
    pytest.param((1, 2, 2, 100, 40, 32, 32), (True, (-1, -1)), dict(dropout=0.2), id="drop-empty-rows"),
    pytest.param((1, 4, 2, 77, 130, 64, 64), (True, (20, -1)),
                 dict(softcap=2.0, alibi="batch", dropout=0.1), id="all-three-causal-win20"),
    pytest.param((1, 2, 1, 1, 17, 16, 16), (False, (-1, -1)), dict(softcap=3.0, alibi="head", dropout=0.3),
                 id="all-three-q1"),
]


@pytest.mark.parametrize("shape,mask,mods", CASES)
def test_against_reference(shape, mask, mods, device):
    check(Case(*shape, causal=mask[0], window=mask[1], **mods), device)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("dtype", [pytest.param(F32, id="fp32")] + ([pytest.param(BF16, id="bf16")] if ON_GPU else []))
def test_layouts_dtypes_strides(layout, dtype, device):
    check(Case(1, 4, 2, 70, 90, 40, dtype=dtype, causal=True, layout=layout, strided=True, softcap=4.0,
               alibi="head", dropout=0.25), device)


def test_large_logits_softcap(device):
    # logits of several hundred: the softcap bounds them (|score| <= 8), ALiBi on top.
    check(Case(1, 2, 1, 100, 140, 64, causal=True, logit_scale=20.0, softcap=8.0, alibi="head"), device)


def test_softcap_changes_the_result(device):
    """A small softcap moves the output far beyond the tolerance; a huge one is no softcap to rounding."""
    q, k, v, _ = make_inputs(Case(1, 2, 2, 60, 60, 32, dtype=F32, logit_scale=4.0), device)
    plain = fused_attn.attention(q, k, v)
    assert (fused_attn.attention(q, k, v, softcap=1.0) - plain).abs().max() > 0.05
    assert (fused_attn.attention(q, k, v, softcap=1e6) - plain).abs().max() < 1e-5
    slopes = alibi_slopes(2, device=device)
    assert (fused_attn.attention(q, k, v, alibi_slopes=slopes) - plain).abs().max() > 0.05


VARLEN = [
    pytest.param(((17, 0, 1, 45), (17, 5, 30, 20)), dict(softcap=2.0, alibi="batch"), id="cap-alibi-batch"),
    pytest.param(((20, 7, 33), (20, 12, 40)), dict(dropout=0.2), id="dropout"),
    pytest.param(((20, 7, 33), (30, 0, 40)), dict(softcap=3.0, alibi="head", dropout=0.1), id="all-three"),
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqs,mods", VARLEN)
def test_varlen(seqs, mods, causal, device):
    res = evaluate_varlen(VarlenCase(*seqs, 2, 1, 32, causal=causal, tail=2, **mods), device)
    assert res.launches.get("fwd") == 1 and res.launches.get("bwd") == 1, res.launches
    assert res.ok, res.describe()


@pytest.mark.parametrize("mods", [dict(softcap=2.0), dict(alibi_slopes="batch"), dict(softcap=1.5, alibi_slopes="head")],
                         ids=["cap", "alibi-batch", "both"])
@pytest.mark.parametrize("paged", [0, 16], ids=["contiguous", "page16"])
def test_kvcache(mods, paged):
    from test_kvcache import DEVICE, check as check_kvcache, make
    q, kc, vc, table, k, v = make(3, 2, 8, 2, 64, 120, 2, F16, paged)
    if "alibi_slopes" in mods:
        mods = dict(mods, alibi_slopes=alibi_slopes(8, 3 if mods["alibi_slopes"] == "batch" else 0, DEVICE))
    check_kvcache(q, kc, vc, table, k, v, torch.tensor([0, 57, 118], dtype=torch.int32, device=DEVICE), 3,
                  causal=True, **mods)


def test_decode_split_path(device):
    """attention()'s split-KV path for a decode step takes the modifiers too."""
    q, k, v, _ = make_inputs(Case(1, 2, 1, 1, 300, 64, dtype=F32), device)
    mods = dict(softcap=2.0, alibi_slopes=alibi_slopes(2, device=device))
    with torch.no_grad():
        before = kernels.launches["decode"]
        out, lse = fused_attn.attention(q, k, v, return_lse=True, **mods)
        assert kernels.launches["decode"] == before + 1
    ref, ref_lse = fused_attn.reference.attention(q, k, v, return_lse=True, upcast=torch.float64, **mods)
    assert (out.double() - ref).abs().max() < 1e-5 and (lse.double() - ref_lse).abs().max() < 1e-5


# --- dropout's random stream ------------------------------------------------------------------------------------

def _run(q, k, v, do, **kw):
    out, lse = fused_attn.attention(q, k, v, return_lse=True, **kw)
    return (out, lse, *torch.autograd.grad(out, (q, k, v), do))


@pytest.fixture
def inputs(device):
    return make_inputs(Case(2, 2, 1, 50, 70, 32, dtype=F32, causal=True), device)


def test_same_state_bitwise_equal_and_calls_differ(inputs, device):
    q, k, v, do = inputs
    state = rng_state(device)
    first = _run(q, k, v, do, causal=True, dropout_p=0.3)
    second = _run(q, k, v, do, causal=True, dropout_p=0.3)  # the generator moved on: another mask
    set_rng_state(state, device)
    again = _run(q, k, v, do, causal=True, dropout_p=0.3)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], second[0])
    torch.manual_seed(1234)
    seeded = _run(q, k, v, do, causal=True, dropout_p=0.3)
    torch.manual_seed(1234)
    assert torch.equal(seeded[0], _run(q, k, v, do, causal=True, dropout_p=0.3)[0])


def test_p0_is_no_dropout(inputs, device):
    q, k, v, do = inputs
    state = rng_state(device)
    for a, b in zip(_run(q, k, v, do, causal=True), _run(q, k, v, do, causal=True, dropout_p=0.0)):
        assert torch.equal(a, b)
    assert torch.equal(rng_state(device), state)  # p = 0 draws nothing


def test_lse_is_before_dropout(inputs):
    q, k, v, do = inputs
    assert torch.equal(_run(q, k, v, do, causal=True)[1], _run(q, k, v, do, causal=True, dropout_p=0.4)[1])


def test_kept_fraction(device):
    mask = fused_attn.dropout_mask(1, 4, 160, 160, 0.17, seed=7, offset=3, device=device)
    assert mask.shape == (1, 4, 160, 160) and mask.dtype == torch.bool
    assert abs(mask.float().mean().item() - 0.83) <= 0.01
    # no structure by head, row or column: each part keeps about the same fraction
    for part in (mask[0, 0], mask[0, 3], mask[0, :, :80], mask[0, :, :, 80:]):
        assert abs(part.float().mean().item() - 0.83) <= 0.02


def test_dropout_mask_seeds(device):
    mask = fused_attn.dropout_mask
    a = mask(1, 2, 40, 50, 0.3, seed=1, offset=0, device=device)
    assert torch.equal(a, mask(1, 2, 40, 50, 0.3, seed=1, offset=0, device=device))
    for other in (mask(1, 2, 40, 50, 0.3, seed=2, offset=0, device=device),
                  mask(1, 2, 40, 50, 0.3, seed=1, offset=1, device=device)):
        assert not torch.equal(a, other)
    # the mask of an element does not depend on the size asked for
    assert torch.equal(mask(2, 3, 60, 70, 0.3, seed=1, offset=0, device=device)[:1, :2, :40, :50], a)
    assert mask(1, 1, 5, 5, 0.0, device=device).all()


def test_dropout_mask_reproduces_the_call(inputs, device):
    """The mask from the generator state before a call, applied by the reference, gives the call's output."""
    q, k, v, _ = inputs
    state = rng_state(device)
    out = fused_attn.attention(q, k, v, causal=True, dropout_p=0.4)
    set_rng_state(state, device)
    mask = fused_attn.dropout_mask(2, 2, 50, 70, 0.4, device=device)
    ref = fused_attn.reference.attention(q, k, v, causal=True, dropout_p=0.4, dropout_mask=mask, upcast=torch.float64)
    assert (out.double() - ref).abs().max() < 1e-5
    wrong = fused_attn.reference.attention(q, k, v, causal=True, dropout_p=0.4, dropout_mask=mask.roll(1, -1),
                                           upcast=torch.float64)
    assert (out.double() - wrong).abs().max() > 1e-2


# --- invalid values ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,match", [
    pytest.param(dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\), got 1.0", id="p1"),
    pytest.param(dict(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\), got -0.1", id="p-neg"),
    pytest.param(dict(dropout_p=float("nan")), ValueError, "dropout_p must be in", id="p-nan"),
    pytest.param(dict(dropout_p=True), TypeError, "dropout_p must be a float", id="p-bool"),
    pytest.param(dict(softcap=-1.0), ValueError, "softcap must be a finite float >= 0 .* got -1.0", id="cap-neg"),
    pytest.param(dict(softcap=float("inf")), ValueError, "softcap must be a finite", id="cap-inf"),
    pytest.param(dict(softcap="1"), TypeError, "softcap must be a float", id="cap-str"),
    pytest.param(dict(alibi_slopes="slopes"), TypeError, "alibi_slopes must be a torch.Tensor", id="slopes-type"),
    pytest.param(dict(alibi_slopes=torch.ones(4, dtype=torch.float16)), TypeError, "alibi_slopes must be float32",
                 id="slopes-dtype"),
    pytest.param(dict(alibi_slopes=torch.ones(3)), ValueError, r"\(Hq,\) = \(4,\) .* got shape \(3,\)",
                 id="slopes-shape"),
    pytest.param(dict(alibi_slopes=torch.ones(2, 4)), ValueError, r"\(B, Hq\) = \(1, 4\)", id="slopes-batch"),
    pytest.param(dict(alibi_slopes=torch.ones(4, device="meta")), ValueError, "alibi_slopes is on meta",
                 id="slopes-device"),
])
def test_invalid(kwargs, exc, match, device):
    q, k, v = (torch.randn(1, 4, 16, 32, device=device) for _ in range(3))
    with pytest.raises(exc, match=match):
        fused_attn.attention(q, k, v, **kwargs)


def test_invalid_elsewhere(device):
    q, k, v = (torch.randn(1, 4, 16, 32, device=device) for _ in range(3))
    with pytest.raises(ValueError, match="needs the keep-mask"):
        fused_attn.reference.attention(q, k, v, dropout_p=0.1)
    with pytest.raises(ValueError, match=r"dropout_mask must be \(B, Hq, Sq, Sk\)"):
        fused_attn.reference.attention(q, k, v, dropout_p=0.1, dropout_mask=torch.ones(1, 4, 16, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match="seed and offset must be given together"):
        fused_attn.dropout_mask(1, 1, 4, 4, 0.1, seed=3)
    with pytest.raises(ValueError, match=r"offset must be an int in \[0, 2147483648\)"):
        fused_attn.dropout_mask(1, 1, 4, 4, 0.1, seed=3, offset=-1)
    with pytest.raises(ValueError, match="seqlen_k must be >= 0"):
        fused_attn.dropout_mask(1, 1, 4, -4, 0.1)
    with pytest.raises(ValueError, match="softcap must be"):
        fused_attn.attention_with_kvcache(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softcap=-2.0)


def test_fully_masked_rows_with_every_modifier(device):
    """Sq = 100 > Sk = 40, causal: rows i < 60 see no key -- still exactly out 0, lse -inf, zero gradients."""
    q, k, v, do = make_inputs(Case(1, 2, 1, 100, 40, 32, dtype=F32, causal=True), device)
    out, lse = fused_attn.attention(q, k, v, causal=True, return_lse=True, softcap=2.0, dropout_p=0.3,
                                    alibi_slopes=alibi_slopes(2, device=device))
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    assert all(torch.isfinite(t).all() for t in (out, dq, dk, dv))
    assert torch.all(out[:, :, :60] == 0) and torch.all(dq[:, :, :60] == 0)
    assert torch.all(lse[:, :, :60] == float("-inf")) and torch.isfinite(lse[:, :, 60:]).all()
