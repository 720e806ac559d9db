"""FP8 attention (q, k, v in float8_e4m3fn / e5m2 with FlashAttention-3's descales, forward only) against the
float64 reference fed the dequantized tensors, by the FP8 rule; quantize_fp8; the drop-ins; errors."""
import pytest
import torch

import fused_attn
from fused_attn import reference
from fused_attn.testing import alibi_slopes, evaluate_fp8

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def fp8_inputs(B, Hq, Hkv, Sq, Sk, D, dtype=E4M3, layout="bhsd", seed=0, dv=None):
    g = torch.Generator().manual_seed(seed)
    dims = (lambda H, S, d: (B, H, S, d) if layout == "bhsd" else (B, S, H, d))
    hd = 1 if layout == "bhsd" else 2
    q, k, v = (torch.randn(*dims(H, S, d), generator=g).to(DEVICE) * s
               for H, S, d, s in ((Hq, Sq, D, 1.0), (Hkv, Sk, D, 1.0), (Hkv, Sk, dv or D, 3.0)))
    (q8, qd), (k8, kd), (v8, vd) = (fused_attn.quantize_fp8(t, hd, heads=Hkv, dtype=dtype) for t in (q, k, v))
    return q8, k8, v8, qd, kd, vd


@pytest.mark.parametrize("shape, dtype, kw", [
    pytest.param((2, 4, 2, 70, 90, 32, None), E4M3, dict(causal=True), id="e4m3-gqa-causal"),
    pytest.param((1, 2, 2, 33, 33, 64, 40), E5M2, dict(window_size=(8, 4)), id="e5m2-mha-win8-4-dv40"),
    pytest.param((1, 4, 1, 50, 120, 16, None), E4M3, dict(softcap=20.0, alibi=True, sinks=True),
                 id="e4m3-mqa-softcap-alibi-sinks"),
    pytest.param((1, 2, 1, 40, 40, 48, None), E4M3, dict(causal=True, layout="bshd", out_dtype=torch.float16),
                 id="e4m3-bshd-fp16-out"),
])
def test_against_reference(shape, dtype, kw):
    B, Hq, Hkv, Sq, Sk, D, dv = shape
    kw = dict(kw)
    layout = kw.pop("layout", "bhsd")
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = alibi_slopes(Hq, 0, DEVICE)
    if kw.pop("sinks", False):
        kw["sinks"] = torch.randn(Hq, device=DEVICE)
    q8, k8, v8, qd, kd, vd = fp8_inputs(B, Hq, Hkv, Sq, Sk, D, dtype, layout, dv=dv)
    (out, lse), metrics = evaluate_fp8(q8, k8, v8, qd, kd, vd, layout=layout, **kw)
    assert out.dtype == kw.get("out_dtype", torch.bfloat16)
    assert all(m.ok for m in metrics.values()), metrics


def test_a_wrong_descale_fails_the_rule():
    """The control: the same call with v's descale doubled is caught (the rule's floor is not vacuous)."""
    q8, k8, v8, qd, kd, vd = fp8_inputs(1, 2, 2, 40, 40, 32)
    out = fused_attn.attention(q8, k8, v8, q_descale=qd, k_descale=kd, v_descale=vd * 2)
    _, metrics = evaluate_fp8(q8, k8, v8, qd, kd, vd)
    ref = reference.attention(q8, k8, v8, q_descale=qd, k_descale=kd, v_descale=vd, upcast=torch.float64)
    assert (out.double() - ref).abs().max() > metrics["out"].budget


def test_varlen_and_drop_ins():
    """Packed FP8 sequences (descales per sequence) equal attention on each sequence alone; flash_attn_func and
    flash_attn_varlen_func pass the descales through."""
    lengths = [30, 0, 45]
    q8, k8, v8, qd, kd, vd = fp8_inputs(1, 4, 2, sum(lengths), sum(lengths), 32, layout="bshd")
    q, k, v = q8[0], k8[0], v8[0]
    descales = [torch.rand(3, 2, device=DEVICE) * x.item() + x.item() / 2 for x in (qd.max(), kd.max(), vd.max())]
    cu = fused_attn.cu_seqlens(lengths, DEVICE)
    out = fused_attn.flash_attn_varlen_func(q, k, v, cu, cu, 45, 45, causal=True, q_descale=descales[0],
                                            k_descale=descales[1], v_descale=descales[2])
    assert torch.equal(out, fused_attn.attention_varlen(q, k, v, cu, cu, 45, 45, causal=True, q_descale=descales[0],
                                                        k_descale=descales[1], v_descale=descales[2]))
    for b, (s0, s1) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        if s1 > s0:
            alone = fused_attn.flash_attn_func(*(t[None, s0:s1] for t in (q, k, v)), causal=True,
                                               q_descale=descales[0][b:b + 1], k_descale=descales[1][b:b + 1],
                                               v_descale=descales[2][b:b + 1])
            assert torch.equal(alone[0], out[s0:s1])


def test_quantize_fp8():
    x = torch.randn(2, 5, 6, 8, device=DEVICE) * torch.arange(1, 7, device=DEVICE).view(1, 1, 6, 1)
    x[1, :, 4:] = 0  # a head group of zeros: descale 1
    for dtype in (E4M3, E5M2):
        x8, d = fused_attn.quantize_fp8(x, dim=2, heads=3, dtype=dtype)
        assert x8.dtype == dtype and d.shape == (2, 3) and d[1, 2] == 1
        back = x8.double() * d.double().repeat_interleave(2, 1)[:, None, :, None]
        half_ulp = 2.0 ** -(4 if dtype == E4M3 else 3)
        assert ((back - x.double()).abs() <= half_ulp * x.double().abs() + d.max().item() * 2.0 ** -9).all()
        assert x8.float().abs().amax() <= torch.finfo(dtype).max
    with pytest.raises(ValueError, match="heads .4. must divide"):
        fused_attn.quantize_fp8(x, dim=2, heads=4)
    with pytest.raises(TypeError, match="dtype must be one of"):
        fused_attn.quantize_fp8(x, dtype=torch.bfloat16)


def test_errors():
    q8, k8, v8, qd, kd, vd = fp8_inputs(1, 2, 2, 16, 16, 16)
    d = dict(q_descale=qd, k_descale=kd, v_descale=vd)
    with pytest.raises(ValueError, match="need v_descale"):
        fused_attn.attention(q8, k8, v8, q_descale=qd, k_descale=kd)
    with pytest.raises(ValueError, match="FP8 attention is forward only"):
        fused_attn.attention(q8, k8, v8, dropout_p=0.1, **d)
    with pytest.raises(ValueError, match="FP8 inputs is inference only: v requires grad"):
        fused_attn.attention(q8, k8, v8.clone().requires_grad_(), **d)
    with pytest.raises(ValueError, match="attn_mask is not implemented with FP8"):
        fused_attn.attention(q8, k8, v8, attn_mask=torch.ones(16, 16, dtype=torch.bool, device=DEVICE), **d)
    with pytest.raises(TypeError, match="out_dtype must be one of"):
        fused_attn.attention(q8, k8, v8, out_dtype=E4M3, **d)
    with pytest.raises(TypeError, match="share one dtype"):
        fused_attn.attention(q8, k8.to(E5M2), v8, **d)
    q = torch.randn(1, 2, 16, 16, device=DEVICE)
    with pytest.raises(ValueError, match="q_descale is for FP8 q, k, v"):
        fused_attn.attention(q, q, q, q_descale=qd)
    with pytest.raises(ValueError, match="out_dtype is for FP8 inputs"):
        fused_attn.attention(q, q, q, out_dtype=torch.bfloat16)
