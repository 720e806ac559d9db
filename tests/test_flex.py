"""Masks of any shape: create_block_mask / BlockMask and flex_attention on the kernels' list walk, against the
float64 reference (which evaluates the mask function itself), PyTorch's own flex_attention, and the built-in band
masks (bitwise, where a mask function equals one)."""
import warnings

import pytest
import torch

import triton
import triton.language as tl

import fused_attn
from fused_attn import kernels
from fused_attn.testing import Case, _measure, kernel_modifiers, make_inputs, run_with_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F16, F32 = torch.float16, torch.float32


def documents(lengths):
    """A document mask over the concatenated documents (each attends within itself, causally)."""
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(DEVICE)

    def mask(b, h, q, kv):
        return (doc[q] == doc[kv]) & (q >= kv)
    return mask


def prefix_lm(prefix):
    return lambda b, h, q, kv: (kv < prefix) | (q >= kv)


def sliding(window):
    return lambda b, h, q, kv: (q >= kv) & (q - kv < window)


def dilated(b, h, q, kv):
    return (q >= kv) & ((q - kv) % 3 == 0)


def per_head(b, h, q, kv):
    """Head 0 causal, head 1 everything, and so on; batch row 1 hides its first 40 keys."""
    return ((h % 2 == 1) | (q >= kv)) & ((b == 0) | (kv >= 40))


def late_rows(b, h, q, kv):
    """Rows before 70 see nothing: fully masked rows and tiles."""
    return (q >= 70) & (kv <= q - 70)


# (mask function, B and H of the mask (None: broadcast), case)
CASES = [
    pytest.param(documents([7, 1, 30, 12, 50, 3, 20, 37]), None, None, Case(1, 2, 2, 160, 160, 64), 32,
                 id="documents-bs32"),
    pytest.param(prefix_lm(45), None, None, Case(2, 4, 2, 130, 130, 40, dtype=F16), 64, id="prefix-lm-gqa-d40"),
    pytest.param(sliding(33), None, None, Case(1, 2, 1, 97, 150, 31, 16), 16, id="sliding-sq<sk-d31-dv16-bs16"),
    pytest.param(dilated, None, None, Case(1, 2, 2, 150, 90, 24, dtype=F16), 128, id="dilated-sq>sk-bs128"),
    pytest.param(per_head, 2, 4, Case(2, 4, 4, 100, 100, 32), 32, id="per-batch-and-head"),
    pytest.param(late_rows, None, None, Case(1, 2, 2, 140, 140, 32), 32, id="fully-masked-rows"),
]


@pytest.mark.parametrize("mask_mod,mask_b,mask_h,case,block", CASES)
def test_against_reference(mask_mod, mask_b, mask_h, case, block):
    q, k, v, do = make_inputs(case, DEVICE)
    bm = fused_attn.create_block_mask(mask_mod, mask_b, mask_h, case.seqlen_q, case.seqlen_k, DEVICE,
                                      BLOCK_SIZE=block)
    before = kernels.launches.copy()
    out, lse = fused_attn.flex_attention(q, k, v, block_mask=bm, enable_gqa=True, return_lse=True)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    assert kernels.launches["fwd"] == before["fwd"] + 1 and kernels.launches["bwd"] == before["bwd"] + 1
    res = _measure(case, dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv), q, k, v, do, True,
                   mods=dict(mask_mod=mask_mod))
    assert res.ok, res.describe()


@pytest.mark.parametrize("mask_mod,case", [
    pytest.param(documents([5, 60, 1, 34]), Case(1, 2, 2, 100, 100, 32), id="documents"),
    pytest.param(prefix_lm(20), Case(2, 2, 2, 70, 90, 16), id="prefix-lm-sq<sk"),
    pytest.param(per_head, Case(2, 2, 2, 64, 64, 16), id="per-batch-and-head"),
])
def test_against_torch_flex_attention(mask_mod, case):
    """PyTorch's flex_attention (its unfused path: no grad, on the CPU too) on the same mask function and its own
    block mask, which fused_attn converts."""
    from torch.nn.attention import flex_attention as flex
    q, k, v = (t.detach().float() for t in make_inputs(case, DEVICE)[:3])
    tbm = flex.create_block_mask(mask_mod, case.batch, case.heads_q, case.seqlen_q, case.seqlen_k, device=DEVICE)
    lse_kw = dict(return_aux=flex.AuxRequest(lse=True)) if hasattr(flex, "AuxRequest") else dict(return_lse=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "called without torch.compile": its unfused path, the one meant here
        want, aux = flex.flex_attention(q, k, v, block_mask=tbm, **lse_kw)
    want_lse = getattr(aux, "lse", aux)
    got, lse = fused_attn.flex_attention(q, k, v, block_mask=tbm, return_lse=True)
    empty = torch.isneginf(want_lse)  # rows that see nothing: out 0, lse -inf in both
    assert torch.equal(torch.isneginf(lse), empty) and (got - want).abs().max() < 1e-5
    assert (lse[~empty] - want_lse[~empty]).abs().max() < 1e-5


@pytest.mark.parametrize("block", [32, 64, 128])
def test_mask_function_equal_to_a_window_is_bitwise_equal(block):
    """A sliding window written as a mask function visits the same tiles in the same order as the built-in window
    (partial blocks before and after the full ones): out, lse and every gradient are bitwise equal."""
    case = Case(1, 2, 2, 200, 200, 32)
    q, k, v, do = make_inputs(case, DEVICE)
    bm = fused_attn.create_block_mask(sliding(50), None, None, 200, 200, DEVICE, BLOCK_SIZE=block)
    got = fused_attn.flex_attention(q, k, v, block_mask=bm, return_lse=True)
    want = fused_attn.attention(q, k, v, causal=True, window_size=(49, 0), return_lse=True)
    got += torch.autograd.grad(got[0], (q, k, v), do)
    want += torch.autograd.grad(want[0], (q, k, v), do)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_block_mask_structure():
    bm = fused_attn.create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 200, 300, DEVICE, BLOCK_SIZE=64)
    assert bm.shape == (1, 1, 200, 300) and bm.BLOCK_SIZE == (64, 64)
    # top-left causal over 4 x 5 blocks: the diagonal blocks and every block of the padded last row are partial
    dense = bm.to_dense()[0, 0].tolist()
    assert dense == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]
    assert bm.sparsity() == pytest.approx(100 * (1 - 10 / 20))
    kv = bm.tables.kv[0, 0].tolist()
    assert kv[1][:3 + 2] == [0, 1, 1, 0, 1]  # row 1: block 0 full, block 1 partial (trailing)
    assert bm.tables.kv.shape[-1] == 16  # 3 + 5 entries, padded to a multiple of 16
    assert bm.tables.bits.shape == (7, 64, 64)  # 3 diagonal + 4 in the last (padded) row
    docs = fused_attn.create_block_mask(documents([64, 64, 64]), None, None, 192, 192, DEVICE, BLOCK_SIZE=64)
    assert docs.sparsity() == pytest.approx(100 * 6 / 9) and docs.tables.bits.shape[0] == 3


def test_mask_data_change_keeps_one_compiled_kernel_per_shape():
    """Masks are data: two different mask functions of the same shape give tables of the same shapes and dtypes
    (what the kernels specialize on), so no recompilation; only their values differ."""
    a = fused_attn.create_block_mask(sliding(20), None, None, 128, 128, DEVICE, BLOCK_SIZE=32)
    b = fused_attn.create_block_mask(documents([100, 28]), None, None, 128, 128, DEVICE, BLOCK_SIZE=32)
    for x, y in ((a.tables.kv, b.tables.kv), (a.tables.kv_slots, b.tables.kv_slots), (a.tables.q, b.tables.q)):
        assert x.shape == y.shape and x.dtype == y.dtype and not torch.equal(x, y)


def test_broadcast_and_combinators():
    both = fused_attn.and_masks(sliding(8), prefix_lm(4))
    either = fused_attn.or_masks(sliding(8), prefix_lm(4))
    q, kv = torch.arange(30)[:, None], torch.arange(30)[None, :]
    assert torch.equal(both(0, 0, q, kv), sliding(8)(0, 0, q, kv) & prefix_lm(4)(0, 0, q, kv))
    assert torch.equal(either(0, 0, q, kv), sliding(8)(0, 0, q, kv) | prefix_lm(4)(0, 0, q, kv))


@pytest.mark.parametrize("call,exc,match", [
    pytest.param(lambda q, bm: fused_attn.flex_attention(q, q, q, score_mod=lambda s, b, h, i, j: s),
                 TypeError, "is a Python function; the kernels call score functions compiled", id="python-score-mod"),
    pytest.param(lambda q, bm: fused_attn.flex_attention(q.requires_grad_(), q, q, score_mod=_hide_odd_keys),
                 ValueError, r"'_hide_odd_keys' has no derivative for the backward: pass fused_attn.ScoreMod",
                 id="score-mod-without-grad"),
    pytest.param(lambda q, bm: fused_attn.flex_attention(q, q, q, mod_args=(1.0,)), ValueError,
                 "mod_args are score_mod's extra arguments", id="mod-args-alone"),
    pytest.param(lambda q, bm: fused_attn.flex_attention(q, q, q, score_mod=_tanh_cap, mod_args=("5",)), TypeError,
                 "mod_args must be tensors, ints or floats, got str", id="mod-args-type"),
    pytest.param(lambda q, bm: fused_attn.flex_attention(q, q, q, fused_attn.ScoreMod(_tanh_cap, grad=abs),
                                                         mod_args=(5.0,)), TypeError,
                 "ScoreMod's grad must be a @triton.jit function", id="python-grad"),
    pytest.param(lambda q, bm: fused_attn.and_masks(sliding(4), _documents_jit), TypeError,
                 "and_masks / or_masks combine Python mask functions", id="jit-in-and-masks"),
    pytest.param(lambda q, bm: fused_attn.flex_attention(q, q[:, :1], q[:, :1]), ValueError, "enable_gqa=True",
                 id="gqa-without-flag"),
    pytest.param(lambda q, bm: fused_attn.flex_attention(q[:, :, :20], q[:, :, :20], q[:, :, :20], block_mask=bm),
                 ValueError, r"block_mask is for \(B, H, Q_LEN, KV_LEN\) = \(1, 1, 32, 32\)", id="mask-shape"),
    pytest.param(lambda q, bm: fused_attn.flex_attention(q, q, q, block_mask="causal"), TypeError,
                 "block_mask must be a fused_attn.BlockMask", id="mask-type"),
    pytest.param(lambda q, bm: fused_attn.create_block_mask(sliding(4), None, None, 32, 32, DEVICE, BLOCK_SIZE=48),
                 ValueError, r"power of two >= 16 \(the kernels. tiles divide it\), got 48", id="block-size"),
    pytest.param(lambda q, bm: fused_attn.create_block_mask(sliding(4), 0, None, 32, 32, DEVICE), ValueError,
                 "B must be a positive int or None, got 0", id="batch"),
    pytest.param(lambda q, bm: fused_attn.create_block_mask("causal", None, None, 32, 32, DEVICE), TypeError,
                 "mask_mod must be a function", id="mask-mod-type"),
])
def test_invalid_inputs(call, exc, match):
    q = torch.randn(1, 2, 32, 16, device=DEVICE)
    bm = fused_attn.create_block_mask(sliding(4), None, None, 32, 32, DEVICE)
    with pytest.raises(exc, match=match):
        call(q, bm)


@pytest.mark.parametrize("mask_shape,case", [
    pytest.param((70, 100), Case(2, 4, 2, 70, 100, 32, causal=True), id="LS-causal-gqa"),
    pytest.param((2, 1, 1, 100), Case(2, 4, 2, 70, 100, 40, window=(30, 5), dtype=F16), id="key-padding-window"),
    pytest.param((1, 2, 70, 100), Case(1, 2, 2, 70, 100, 33, layout="bshd", dropout=0.2),
                 id="per-head-bshd-odd-d-dropout"),
    pytest.param((2, 2, 100, 60), Case(2, 2, 1, 100, 60, 16, 24), id="full-shape-mqa-dv24"),
])
def test_attn_mask_against_reference(mask_shape, case):
    """attention(..., attn_mask=bool) with the band (and dropout, replayed for the reference) on top, forward and
    backward, against the float64 reference; some rows see nothing (out 0, lse -inf)."""
    q, k, v, do = make_inputs(case, DEVICE)
    g = torch.Generator().manual_seed(1)
    mask = (torch.rand(mask_shape, generator=g) > 0.4).to(DEVICE)
    mask[..., :3, :] = False
    mods = kernel_modifiers(case, case.batch, DEVICE)
    (out, lse), keep = run_with_mask(lambda: fused_attn.attention(
        q, k, v, causal=case.causal, window_size=case.window, layout=case.layout, attn_mask=mask, return_lse=True,
        **mods), mods, DEVICE, (case.batch, case.heads_q, case.seqlen_q, case.seqlen_k))
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    assert torch.isneginf(lse[..., :3]).all()
    res = _measure(case, dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv), q, k, v, do, True,
                   mods=dict(mods, attn_mask=mask, dropout_mask=keep))
    assert res.ok, res.describe()


@pytest.mark.parametrize("bias_shape,case,repeat", [
    pytest.param((70, 100), Case(2, 4, 2, 70, 100, 32, causal=True), True, id="LS-causal-gqa"),
    pytest.param((2, 1, 1, 100), Case(2, 2, 2, 70, 100, 40, window=(30, 5), dtype=F16), False,
                 id="key-bias-window-f16"),
    pytest.param((2, 2, 100, 60), Case(2, 2, 1, 100, 60, 16, 24, layout="bshd", softcap=20.0, alibi="heads"), False,
                 id="full-shape-mqa-bshd-softcap-alibi"),
])
def test_float_bias_and_its_gradient_against_reference(bias_shape, case, repeat):
    """attention(..., attn_mask=float) with the band on top: out, lse, dq, dk, dv and the bias's own gradient (summed
    over the dimensions it broadcasts over; deterministic: a second backward is bitwise equal) against the float64
    reference; -inf entries hide pairs, whole blocks and the first rows (out 0, lse -inf, gradient 0)."""
    q, k, v, do = make_inputs(case, DEVICE)
    g = torch.Generator().manual_seed(2)
    bias = torch.randn(bias_shape, generator=g).mul(2).to(DEVICE, case.dtype)
    bias[..., :3, :] = float("-inf")
    bias[..., :, 32:64] = float("-inf")
    bias[torch.rand(bias_shape, generator=g).to(DEVICE) < 0.2] = float("-inf")
    bias.requires_grad_()
    mods = kernel_modifiers(case, case.batch, DEVICE)
    out, lse = fused_attn.attention(q, k, v, causal=case.causal, window_size=case.window, layout=case.layout,
                                    attn_mask=bias, return_lse=True, **mods)
    grads = torch.autograd.grad(out, (q, k, v, bias), do, retain_graph=repeat)
    assert grads[3].shape == bias.shape and torch.isneginf(lse[..., :3]).all()
    if repeat:
        assert all(torch.equal(a, b) for a, b in zip(grads, torch.autograd.grad(out, (q, k, v, bias), do)))
    got = dict(out=out, lse=lse, **dict(zip(("dq", "dk", "dv", "dbias"), grads)))
    res = _measure(case, got, q, k, v, do, True, mods=dict(mods, attn_mask=bias))
    assert res.ok, res.describe()


# Score functions, each as the kernels take it (@triton.jit, with its derivative) and as the reference does (torch).
@triton.jit
def _tanh_cap(score, b, h, q_idx, kv_idx, CAP):
    t = 2.0 / (1.0 + tl.exp(-2.0 * score / CAP)) - 1.0
    return CAP * t


@triton.jit
def _tanh_cap_grad(score, b, h, q_idx, kv_idx, CAP):
    t = 2.0 / (1.0 + tl.exp(-2.0 * score / CAP)) - 1.0
    return 1.0 - t * t


@triton.jit
def _relative_bias(score, b, h, q_idx, kv_idx, TABLE, span):
    """T5-style: a learned (frozen here) bias per head and clipped distance, read from a table in mod_args."""
    d = tl.minimum(tl.maximum(kv_idx - q_idx, -span), span) + span
    return score + tl.load(TABLE + h * (2 * span + 1) + d) + b * 0.25


@triton.jit
def _unit(score, b, h, q_idx, kv_idx, TABLE, span):
    return 1.0


@triton.jit
def _hide_odd_keys(score, b, h, q_idx, kv_idx):
    """-inf from a score function: a mask in any tile, including rows it hides entirely (rows 0 and 1)."""
    return tl.where((kv_idx % 2 == 1) | (q_idx < 2), float("-inf"), score)


def _relative_reference(table, span):
    def mod(score, b, h, q, kv):
        d = (kv - q).clamp(-span, span) + span
        return score + table[h, d] + b * 0.25
    return mod


_TABLE = torch.randn(4, 2 * 8 + 1, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("score_mod,reference_mod,mod_args,case,mask_mod", [
    pytest.param(fused_attn.ScoreMod(_tanh_cap, _tanh_cap_grad), lambda s, b, h, q, kv: 5.0 * torch.tanh(s / 5.0),
                 (5.0,), Case(2, 4, 2, 100, 100, 33), None, id="tanh-cap-gqa-odd-d"),
    pytest.param(fused_attn.ScoreMod(_relative_bias, _unit), _relative_reference(_TABLE.to(DEVICE), 8),
                 (_TABLE.to(DEVICE), 8), Case(2, 4, 4, 90, 130, 40, dtype=F16), prefix_lm(30),
                 id="relative-bias-prefix-lm-f16"),
    pytest.param(fused_attn.ScoreMod(_hide_odd_keys), None, (), Case(1, 2, 2, 64, 64, 16), None,
                 id="minus-inf-no-grad"),
])
def test_score_mod_against_reference(score_mod, reference_mod, mod_args, case, mask_mod):
    """flex_attention with a @triton.jit score_mod (and its derivative), on top of a block mask or none, against the
    float64 reference given the same score function in torch."""
    q, k, v, do = make_inputs(case, DEVICE)
    bm = None if mask_mod is None else fused_attn.create_block_mask(mask_mod, None, None, case.seqlen_q,
                                                                   case.seqlen_k, DEVICE, BLOCK_SIZE=32)
    grad = score_mod.grad is not None
    with torch.set_grad_enabled(grad):
        out, lse = fused_attn.flex_attention(q, k, v, score_mod, bm, enable_gqa=True, return_lse=True,
                                             mod_args=mod_args)
    got = dict(out=out, lse=lse)
    if grad:
        got.update(zip(("dq", "dk", "dv"), torch.autograd.grad(out, (q, k, v), do)))
    if reference_mod is None:  # the same mask written as a mask (the reference has no -inf scores of its own)
        mods = dict(mask_mod=lambda b, h, q, kv: (kv % 2 == 0) & (q >= 2))
    else:
        mods = dict(score_mod=reference_mod, mask_mod=mask_mod)
    res = _measure(case, got, q, k, v, do, grad, mods=mods)
    assert res.ok, res.describe()


@triton.jit
def _documents_jit(b, h, q_idx, kv_idx, DOC):
    return (tl.load(DOC + q_idx) == tl.load(DOC + kv_idx)) & (q_idx >= kv_idx)


def test_jit_mask_mod_equals_python_mask_mod_bitwise():
    """The same document mask as a @triton.jit function (evaluated in the kernels, classified by a counting kernel)
    and as a Python one (bits): the same block lists, and out, lse and gradients bitwise equal."""
    lengths = [7, 1, 30, 12, 50, 3, 20, 37]
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(DEVICE)
    jit = fused_attn.create_block_mask(_documents_jit, None, None, 160, 160, DEVICE, BLOCK_SIZE=32, mod_args=(doc,))
    py = fused_attn.create_block_mask(documents(lengths), None, None, 160, 160, DEVICE, BLOCK_SIZE=32)
    assert torch.equal(jit.tables.kv, py.tables.kv) and torch.equal(jit.tables.q, py.tables.q)
    assert "@triton.jit mask_mod=_documents_jit" in repr(jit)
    case = Case(1, 2, 2, 160, 160, 32)
    q, k, v, do = make_inputs(case, DEVICE)
    got, want = (list(fused_attn.flex_attention(q, k, v, block_mask=m, return_lse=True)) for m in (jit, py))
    got += torch.autograd.grad(got[0], (q, k, v), do)
    want += torch.autograd.grad(want[0], (q, k, v), do)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("mask,exc,match", [
    pytest.param(torch.zeros(8, 8, dtype=torch.float64), TypeError, "float16 / bfloat16 / float32 bias, got "
                 "torch.float64", id="float64"),
    pytest.param(torch.zeros(8, 8, dtype=torch.int32), TypeError, "attn_mask must be bool", id="int"),
    pytest.param(torch.zeros(3, 8, 8, dtype=torch.bool), ValueError, r"does not broadcast to \(B, Hq, Sq, Sk\)",
                 id="shape"),
    pytest.param("causal", TypeError, "attn_mask must be a torch.Tensor", id="type"),
])
def test_attn_mask_invalid(mask, exc, match):
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    with pytest.raises(exc, match=match):
        fused_attn.attention(q, q, q, attn_mask=mask.to(DEVICE) if isinstance(mask, torch.Tensor) else mask)
