"""Drop-in routes: the SDPA replacement and its override, flash_attn_func, flash_attn_varlen_func."""
import pytest
import torch
import torch.nn.functional as F

import fused_attn
from fused_attn import kernels
from fused_attn.numerics import FACTORS, Metric

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rand(*shape, dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(sum(shape))
    return torch.randn(shape, generator=g).to(DEVICE, dtype).requires_grad_(grad)


def launched(fn):
    before = kernels.launches["fwd"]
    result = fn()
    return result, kernels.launches["fwd"] - before


@pytest.mark.parametrize("shapes,kwargs", [
    pytest.param(((2, 4, 33, 32), (2, 4, 47, 32), (2, 4, 47, 32)), {}, id="plain"),
    pytest.param(((2, 4, 33, 32), (2, 4, 47, 32), (2, 4, 47, 24)), {"is_causal": True}, id="causal-L<S-Ev"),
    pytest.param(((1, 2, 60, 16), (1, 2, 20, 16), (1, 2, 20, 16)), {"is_causal": True}, id="causal-L>S-topleft"),
    pytest.param(((2, 8, 40, 64), (2, 2, 40, 64), (2, 2, 40, 64)), {"enable_gqa": True, "is_causal": True}, id="gqa"),
    pytest.param(((2, 3, 2, 17, 16), (2, 3, 2, 29, 16), (2, 3, 2, 29, 16)), {"scale": 0.3}, id="extra-batch-dims"),
    pytest.param(((3, 19, 16), (3, 23, 16), (3, 23, 8)), {"is_causal": True}, id="3d"),
])
def test_sdpa_matches_torch_and_runs_the_kernels(shapes, kwargs):
    q, k, v = (rand(*s, grad=True) for s in shapes)
    got, n = launched(lambda: fused_attn.scaled_dot_product_attention(q, k, v, **kwargs))
    assert n == 1 and fused_attn.explain(q, k, v, **kwargs).startswith("fused_attn Triton kernels")
    ref = F.scaled_dot_product_attention(*(t.double() for t in (q, k, v)), **kwargs)
    pt = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert got.shape == pt.shape
    m = Metric.measure(got, ref, pt, q.dtype, FACTORS["out"])
    assert m.ok, m
    do = torch.randn_like(got)
    grads = torch.autograd.grad(got, (q, k, v), do)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do.double())
    for a, b in zip(grads, ref_grads):
        assert torch.isfinite(a).all() and (a.double() - b).abs().max() < 1e-4


@pytest.mark.parametrize("q_shape,kv_len,mask_shape,kind", [
    pytest.param((2, 4, 33, 32), 47, (33, 47), "bool", id="LS"),
    pytest.param((2, 4, 33, 32), 47, (2, 1, 1, 47), "bool", id="key-padding"),
    pytest.param((2, 4, 33, 32), 47, (2, 4, 33, 47), "bool", id="full"),
    pytest.param((3, 19, 16), 23, (3, 19, 23), "bool", id="3d"),
    pytest.param((2, 3, 2, 17, 16), 29, (3, 1, 17, 29), "bool", id="5d-broadcast"),
    pytest.param((2, 4, 33, 32), 47, (2, 1, 33, 47), "float", id="float-bias-with-grad"),
    pytest.param((2, 3, 2, 17, 16), 29, (1, 17, 29), "float", id="float-5d-broadcast"),
])
def test_sdpa_masks_run_on_the_kernels(q_shape, kv_len, mask_shape, kind):
    """attn_mask runs on the kernels -- bool (True: take part) as block lists, float as an additive bias (-inf:
    hidden) with its gradient; against torch's SDPA in float64 on rows that see a key (a fully masked row: 0 here,
    NaN in torch)."""
    q = rand(*q_shape, grad=True)
    k, v = (rand(*q_shape[:-2], kv_len, q_shape[-1], grad=True) for _ in range(2))
    if kind == "bool":
        mask = rand(*mask_shape) > -0.5
        mask[..., 0, :] = False  # the first query row sees nothing
        inputs, visible = (q, k, v), mask
    else:
        mask = rand(*mask_shape).masked_fill(rand(*mask_shape) < -0.5, float("-inf"))
        mask[..., 0, :] = float("-inf")
        mask.requires_grad_()
        inputs, visible = (q, k, v, mask), mask != float("-inf")
    got, n = launched(lambda: fused_attn.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert n == 1 and f"the {kind} attn_mask" in fused_attn.explain(q, k, v, attn_mask=mask)
    ref = F.scaled_dot_product_attention(*(t.double() for t in (q, k, v)),
                                         attn_mask=mask if kind == "bool" else mask.double())
    pt = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    rows = visible.expand(*got.shape[:-1], kv_len).any(-1)
    assert torch.equal(got[~rows], torch.zeros_like(got[~rows]))
    assert Metric.measure(got[rows], ref[rows], pt[rows], q.dtype, FACTORS["out"]).ok
    do = torch.randn_like(got) * rows[..., None]
    grads = torch.autograd.grad(got, inputs, do)
    ref_grads = torch.autograd.grad(ref, inputs, do.double(), allow_unused=True)
    for a, b in zip(grads, ref_grads):
        assert a.shape == b.shape and (a.double() - torch.nan_to_num(b)).abs().max() < 1e-4


@pytest.mark.parametrize("kwargs,reason", [
    pytest.param({"attn_mask": "bool", "is_causal": True}, "attn_mask together with is_causal", id="mask-and-causal"),
    pytest.param({"dropout_p": 1.0}, r"dropout_p must be in [0, 1), got 1.0", id="dropout-1"),
    pytest.param({"dtype": torch.float64}, "unsupported dtype torch.float64", id="float64"),
    pytest.param({"scale": -1.0}, "finite positive float, got -1.0", id="negative-scale"),
])
def test_sdpa_falls_back_to_torch_and_says_why(kwargs, reason):
    kwargs = dict(kwargs)
    dtype = kwargs.pop("dtype", torch.float32)
    q, k, v = rand(2, 2, 9, 16, dtype=dtype), rand(2, 2, 11, 16, dtype=dtype), rand(2, 2, 11, 16, dtype=dtype)
    if kwargs.get("attn_mask") == "bool":
        kwargs["attn_mask"] = rand(9, 11) > 0
    assert reason in fused_attn.explain(q, k, v, **kwargs)
    torch.manual_seed(0)
    def run(fn):
        try:
            return fn(q, k, v, **kwargs)
        except RuntimeError as e:  # torch refuses some of them: the drop-in raises the same
            return str(e)
    got, n = launched(lambda: run(fused_attn.scaled_dot_product_attention))
    torch.manual_seed(0)
    want = run(F.scaled_dot_product_attention)
    assert n == 0 and (got == want if isinstance(want, str) else torch.equal(got, want))


def test_sdpa_override_is_scoped():
    original = F.scaled_dot_product_attention
    q = rand(1, 2, 16, 32)
    with fused_attn.sdpa_override():
        assert F.scaled_dot_product_attention is fused_attn.scaled_dot_product_attention
        _, n = launched(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True))
        assert n == 1
    assert F.scaled_dot_product_attention is original
    with pytest.raises(ZeroDivisionError):
        with fused_attn.sdpa_override():
            1 / 0
    assert F.scaled_dot_product_attention is original


def test_flash_attn_func_layout_and_probs():
    q, k, v = rand(2, 37, 4, 32, grad=True), rand(2, 50, 2, 32, grad=True), rand(2, 50, 2, 32, grad=True)
    out, n = launched(lambda: fused_attn.flash_attn_func(q, k, v, causal=True, window_size=(9, 5)))
    assert n == 1 and out.shape == (2, 37, 4, 32)
    # causal=True sets the right side to 0, as in flash_attn.
    want = fused_attn.attention(q, k, v, window_size=(9, 0), layout="bshd")
    assert torch.equal(out, want)
    out, lse, probs = fused_attn.flash_attn_func(q, k, v, window_size=(9, 5), return_attn_probs=True,
                                                 deterministic=True)
    _, ref_lse, ref_probs = fused_attn.reference.attention(q, k, v, window_size=(9, 5), layout="bshd",
                                                           return_lse=True, return_probs=True,
                                                           upcast=torch.float64)
    assert lse.shape == (2, 4, 37) and probs.shape == (2, 4, 37, 50)
    assert (probs.double() - ref_probs).abs().max() < 1e-5


def test_sdpa_dropout_runs_on_the_kernels():
    """dropout_p > 0 runs in the kernels (their Philox stream, not torch's): the output is the reference's with the
    keep-mask fused_attn.dropout_mask draws from the same generator state."""
    q, k, v = rand(2, 2, 9, 16, grad=True), rand(2, 2, 11, 16, grad=True), rand(2, 2, 11, 16, grad=True)
    assert fused_attn.explain(q, k, v, dropout_p=0.3).startswith("fused_attn Triton kernels")
    torch.manual_seed(7)
    got, n = launched(lambda: fused_attn.scaled_dot_product_attention(q, k, v, dropout_p=0.3))
    torch.manual_seed(7)
    mask = fused_attn.dropout_mask(2, 2, 9, 11, 0.3, device=DEVICE)
    ref = fused_attn.reference.attention(q, k, v, dropout_p=0.3, dropout_mask=mask, upcast=torch.float64)
    assert n == 1 and (got.double() - ref).abs().max() < 1e-5


def test_flash_attn_func_modifiers():
    """softcap, alibi_slopes and dropout_p reach the kernels as fused_attn.attention takes them; the returned
    probabilities are the modified softmax (before dropout)."""
    q, k, v = rand(2, 37, 4, 32), rand(2, 50, 2, 32), rand(2, 50, 2, 32)
    slopes = torch.rand(2, 4, device=DEVICE)
    mods = dict(softcap=3.0, alibi_slopes=slopes)
    torch.manual_seed(5)
    out, n = launched(lambda: fused_attn.flash_attn_func(q, k, v, dropout_p=0.2, causal=True, **mods))
    torch.manual_seed(5)
    assert n == 1 and torch.equal(out, fused_attn.attention(q, k, v, causal=True, layout="bshd", dropout_p=0.2,
                                                            **mods))
    _, lse, probs = fused_attn.flash_attn_func(q, k, v, causal=True, return_attn_probs=True, **mods)
    _, ref_probs = fused_attn.reference.attention(q, k, v, causal=True, layout="bshd", return_probs=True,
                                                  upcast=torch.float64, **mods)
    assert (probs.double() - ref_probs).abs().max() < 1e-5


@pytest.mark.parametrize("window", [torch.tensor([12, 7]), torch.tensor([12, 7], dtype=torch.int32),
                                    (torch.tensor(12), torch.tensor(7)), __import__("numpy").array([12, 7]),
                                    [__import__("numpy").int64(12), 7]],
                         ids=["tensor", "int32-tensor", "0d-tensors", "ndarray", "numpy-ints"])
def test_flash_attn_func_takes_any_pair_of_integers(window):
    """FlashAttention-2 takes window_size as any pair of integers (a 2-element tensor too), negative = unbounded."""
    q, k, v = rand(1, 23, 2, 16), rand(1, 30, 2, 16), rand(1, 30, 2, 16)
    want = fused_attn.attention(q, k, v, window_size=(12, 7), layout="bshd")
    out, n = launched(lambda: fused_attn.flash_attn_func(q, k, v, window_size=window))
    assert n == 1 and torch.equal(out, want)
    assert torch.equal(fused_attn.flash_attn_func(q, k, v, window_size=(-5, 7)),
                       fused_attn.attention(q, k, v, window_size=(-1, 7), layout="bshd"))


@pytest.mark.parametrize("window,match", [((1.5, 2), "left must be an integer"),
                                          (torch.tensor([1.0, 2.0]), "left must be an integer"),
                                          ((3, True), "right must be an integer"),
                                          (4, "a pair"), ((1, 2, 3), "3 values")])
def test_flash_attn_func_window_errors_name_the_value(window, match):
    q = rand(1, 8, 2, 16)
    with pytest.raises(TypeError, match=match):
        fused_attn.flash_attn_func(q, q, q, window_size=window)


def test_flash_attn_varlen_func_layout_and_probs():
    cu_q = torch.tensor([0, 20, 20, 45], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 30, 41, 60], dtype=torch.int32, device=DEVICE)
    q, k, v = rand(45, 4, 32, grad=True), rand(60, 2, 32, grad=True), rand(60, 2, 24, grad=True)
    out, n = launched(lambda: fused_attn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 25, 30, causal=True,
                                                                window_size=torch.tensor([9, 5])))
    assert n == 1 and out.shape == (45, 4, 24)
    assert torch.equal(out, fused_attn.attention_varlen(q, k, v, cu_q, cu_k, 25, 30, window_size=(9, 0)))
    out, lse, probs = fused_attn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 25, 30, window_size=(9, 5),
                                                        return_attn_probs=True, deterministic=True)
    assert lse.shape == (4, 45) and probs.shape == (3, 4, 25, 30)
    for b, (q0, q1, k0, k1) in enumerate([(0, 20, 0, 30), (20, 45, 41, 60)]):
        b = 2 * b  # sequence 1 is empty
        _, ref_probs = fused_attn.reference.attention(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1],
                                                      window_size=(9, 5), layout="bshd", return_probs=True,
                                                      upcast=torch.float64)
        assert (probs[b, :, :q1 - q0, :k1 - k0].double() - ref_probs[0]).abs().max() < 1e-5
        assert probs[b, :, q1 - q0:].abs().sum() == 0 and probs[b, :, :, k1 - k0:].abs().sum() == 0
    assert probs[1].abs().max() == 0


def test_flash_attn_varlen_func_rejects_what_it_does_not_implement():
    q, cu = rand(8, 4, 16), torch.tensor([0, 3, 8], dtype=torch.int32, device=DEVICE)
    with pytest.raises(NotImplementedError, match="q_v"):
        fused_attn.flash_attn_varlen_func(q, q, q, cu, cu, 5, 5, q_v=q)
    with pytest.raises(TypeError, match="scheduler_metadata must come from fused_attn.get_scheduler_metadata"):
        fused_attn.flash_attn_varlen_func(q, q, q, cu, cu, 5, 5, seqused_k=cu[1:] - cu[:-1], scheduler_metadata=q)
    with pytest.raises(ValueError, match="scheduler_metadata plans calls over a KV cache"):
        meta = fused_attn.get_scheduler_metadata(2, 5, 5, 4, 4, 16, cu[1:] - cu[:-1], qkv_dtype=q.dtype,
                                                 cu_seqlens_q=cu)
        fused_attn.flash_attn_varlen_func(q, q, q, cu, cu, 5, 5, scheduler_metadata=meta)
    with pytest.raises(NotImplementedError, match="return_attn_probs over a KV cache"):
        fused_attn.flash_attn_varlen_func(q, q, q, cu, cu, 5, 5, seqused_k=torch.tensor([3, 5], dtype=torch.int32),
                                          return_attn_probs=True)


def test_flash_attn_varlen_func_modifiers():
    cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=DEVICE)
    q = rand(8, 4, 16)
    mods = dict(softcap=2.0, alibi_slopes=torch.rand(2, 4, device=DEVICE))
    torch.manual_seed(3)
    out, lse, probs = fused_attn.flash_attn_varlen_func(q, q, q, cu, cu, 5, 5, dropout_p=0.25,
                                                        return_attn_probs=True, **mods)
    torch.manual_seed(3)
    want, want_lse = fused_attn.attention_varlen(q, q, q, cu, cu, 5, 5, dropout_p=0.25, return_lse=True, **mods)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    _, ref_probs = fused_attn.reference.attention(q[None, 3:], q[None, 3:], q[None, 3:], layout="bshd",
                                                  return_probs=True, upcast=torch.float64, softcap=2.0,
                                                  alibi_slopes=mods["alibi_slopes"][1])
    assert (probs[1].abs().double() - ref_probs[0]).abs().max() < 1e-5  # dropped ones negated (FA2's S_dmask)
