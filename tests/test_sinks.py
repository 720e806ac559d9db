"""Attention sinks (one learnable logit per query head in each row's softmax denominator, gpt-oss): attention,
attention_varlen and attention_with_kvcache (split-KV, the combine kernel adding them) against the float64
reference, the sinks' own gradient included; the vLLM-style drop-in name s_aux."""
import pytest
import torch

import fused_attn
from fused_attn import kernels, reference
from fused_attn.numerics import FACTORS, Metric
from fused_attn.testing import Case, _measure, kernel_modifiers, make_inputs, run_with_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sinks_for(heads, seed=3):
    """Sinks large enough to matter (a few rows' worth of weight), one very negative (a no-op head)."""
    s = torch.randn(heads, generator=torch.Generator().manual_seed(seed)).mul(2.0)
    s[-1] = -30.0
    return s.to(DEVICE)


@pytest.mark.parametrize("case", [
    pytest.param(Case(2, 4, 2, 70, 70, 32, causal=True), id="causal-gqa"),
    pytest.param(Case(1, 4, 4, 90, 60, 24, 40, window=(20, 0), softcap=15.0, alibi="heads", layout="bshd"),
                 id="sq>sk-window-softcap-alibi-bshd"),
    pytest.param(Case(2, 2, 1, 50, 80, 33, dtype=torch.float32, dropout=0.2), id="mqa-odd-d-dropout-fp32"),
])
def test_sinks_against_reference(case):
    """out, lse (which includes the sinks), dq, dk, dv and the sinks' gradient; rows that see no key (Sq > Sk
    causal-like windows) get out 0 and lse = sink."""
    q, k, v, do = make_inputs(case, DEVICE)
    sinks = sinks_for(case.heads_q).requires_grad_()
    mods = kernel_modifiers(case, case.batch, DEVICE)
    (out, lse), keep = run_with_mask(lambda: fused_attn.attention(
        q, k, v, causal=case.causal, window_size=case.window, layout=case.layout, return_lse=True, sinks=sinks,
        **mods), mods, DEVICE, (case.batch, case.heads_q, case.seqlen_q, case.seqlen_k))
    grads = torch.autograd.grad(out, (q, k, v, sinks), do)
    got = dict(out=out, lse=lse, **dict(zip(("dq", "dk", "dv", "dsinks"), grads)))
    res = _measure(case, got, q, k, v, do, True, mods=dict(mods, sinks=sinks, dropout_mask=keep))
    assert res.ok, res.describe()


def test_sinks_varlen_and_kvcache():
    """Packed sequences (one with no keys: out 0, lse = sink; fwd + bwd) and decoding against a cache with and
    without splits (a row with an empty cache), against the reference."""
    torch.manual_seed(0)
    Hq, Hkv, D = 4, 2, 16
    sinks = sinks_for(Hq).requires_grad_()
    cu_q, cu_k = fused_attn.cu_seqlens([30, 5, 40], DEVICE), fused_attn.cu_seqlens([30, 0, 60], DEVICE)
    q = torch.randn(75, Hq, D, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(90, Hkv, D, device=DEVICE, requires_grad=True) for _ in range(2))
    out, lse = fused_attn.attention_varlen(q, k, v, cu_q, cu_k, 40, 60, causal=True, sinks=sinks, return_lse=True)
    want, want_lse = reference.attention_varlen(q, k, v, cu_q, cu_k, 40, 60, causal=True, sinks=sinks,
                                                return_lse=True, upcast=torch.float64)
    do = torch.randn_like(out)
    got_g = torch.autograd.grad(out, (q, k, v, sinks), do)
    want_g = torch.autograd.grad(want, (q, k, v, sinks), do.double())
    assert (lse[:, 30:35] - sinks.detach()[:, None]).abs().max() < 1e-5 and not out[30:35].any()
    assert (out - want).abs().max() < 1e-5 and (lse - want_lse).abs().max() < 1e-5
    assert all((a - b).abs().max() < 1e-5 for a, b in zip(got_g, want_g))

    k_cache, v_cache = (torch.randn(2, 160, Hkv, D, device=DEVICE) for _ in range(2))
    qd = torch.randn(2, 1, Hq, D, device=DEVICE)
    seqlens = torch.tensor([150, 0], dtype=torch.int32, device=DEVICE)
    want, want_lse = reference.attention_with_kvcache(qd, k_cache, v_cache, cache_seqlens=seqlens,
                                                      sinks=sinks.detach(), return_lse=True, upcast=torch.float64)
    for splits in (1, 3):
        before = kernels.launches["_attn_combine_kernel"]
        got, got_lse = fused_attn.attention_with_kvcache(qd, k_cache, v_cache, cache_seqlens=seqlens,
                                                         sinks=sinks.detach(), num_splits=splits, return_lse=True)
        # one split: the sinks join in the split kernel; several: in the combine kernel
        assert kernels.launches["_attn_combine_kernel"] == before + (splits > 1)
        assert (got - want).abs().max() < 1e-5 and (got_lse - want_lse).abs().max() < 1e-5


def test_s_aux_is_sinks_in_the_flash_attn_drop_ins():
    q, k, v = (torch.randn(1, 20, 2, 16, device=DEVICE) for _ in range(3))
    sinks = sinks_for(2)
    got = fused_attn.flash_attn_func(q, k, v, causal=True, s_aux=sinks)
    want = fused_attn.attention(q, k, v, causal=True, layout="bshd", sinks=sinks)
    assert torch.equal(got, want)
    m = Metric.measure(got, reference.attention(q, k, v, causal=True, layout="bshd", sinks=sinks,
                                                upcast=torch.float64),
                       reference.attention(q, k, v, causal=True, layout="bshd", sinks=sinks, upcast=None),
                       torch.float32, FACTORS["out"])
    assert m.ok, m


@pytest.mark.parametrize("sinks,exc,match", [
    pytest.param(torch.zeros(4, dtype=torch.float16), TypeError, "sinks must be float32", id="dtype"),
    pytest.param(torch.zeros(3), ValueError, r"sinks must be \(Hq,\) = \(4,\), got shape \(3,\)", id="shape"),
    pytest.param([0.0] * 4, TypeError, "sinks must be a torch.Tensor", id="type"),
])
def test_sinks_invalid(sinks, exc, match):
    q = torch.randn(1, 4, 8, 16, device=DEVICE)
    with pytest.raises(exc, match=match):
        fused_attn.attention(q, q, q, sinks=sinks.to(DEVICE) if isinstance(sinks, torch.Tensor) else sinks)


def test_weights_rebuilt_from_an_lse_with_sinks():
    """attention_probs from the kernels' lse (which includes the sinks) against the reference's probabilities of a
    softmax that includes them: the keys' share only, rows summing to less than 1."""
    q, k = (torch.randn(1, 4, 30, 16, device=DEVICE) for _ in range(2))
    sinks = sinks_for(4)
    _, lse = fused_attn.attention(q, k, k, causal=True, sinks=sinks, return_lse=True)
    got = fused_attn.attention_probs(q, k, lse, causal=True, sinks=sinks)
    want = reference.probs(q, k, causal=True, sinks=sinks)
    assert (got - want).abs().max() < 1e-5 and (want.sum(-1) < 1).all()
