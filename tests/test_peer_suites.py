"""What FlashAttention-2's and PyTorch FlexAttention's own test suites, and a review, found wrong in the drop-ins
-- each case here failed before its fix: FP8 without descales, a differentiable lse, PyTorch block lists
(from_kv_blocks), trainable sinks on a decode-shaped call, tensors edited in place before the backward, float
mask functions, FlashAttention-2's S_dmask sign, the split plan, the output's memory order, host syncs in the mask
classification, the BlockMask fields and the key / value batch broadcast of FlexAttention."""
import gc
import warnings

import pytest
import torch

import fused_attn
from fused_attn import kernels, reference
from fused_attn.blockmask import _converted, as_block_mask
from fused_attn.testing import Syncs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F64 = torch.float64


def rand(*shape, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE).requires_grad_(grad)


def assert_close(got, want, pt, factor=3.0):
    """FlashAttention's rule: the kernels' error against the float64 reference within `factor` times the error of
    the same naive computation in float32 (pt), plus a rounding floor."""
    err, base = (got.double() - want).abs().max(), (pt.double() - want).abs().max()
    assert err <= factor * base + 1e-5, (float(err), float(base))


def grads_of(fn, inputs, seed=1):
    """The output, lse and the gradients of a loss that uses both (weights drawn from `seed`)."""
    out, lse = fn(*inputs)
    w, u = rand(*out.shape, seed=seed).to(out.dtype), rand(*lse.shape, seed=seed + 1)
    loss = (out * w).sum() + (torch.where(torch.isinf(lse), 0.0, lse) * u).sum()
    return (out, lse, *torch.autograd.grad(loss, [t for t in inputs if t.requires_grad]))


# ---- FP8 without descales: refused everywhere, as attention() refuses it

@pytest.mark.parametrize("call", [
    pytest.param(lambda q: fused_attn.flex_attention(q, q, q), id="flex"),
    pytest.param(lambda q: fused_attn.scaled_dot_product_attention(q, q, q), id="sdpa"),
    pytest.param(lambda q: fused_attn.explain(q, q, q), id="explain"),
])
def test_fp8_without_descales_is_refused(call):
    q = rand(1, 2, 16, 16).to(torch.float8_e5m2)
    with pytest.raises(TypeError, match="float8_e5m2: FP8 inputs need their descales"):
        call(q)


# ---- the lse is differentiable (PyTorch's test_differentiable_logsumexp / test_lse_masked_output)

@pytest.mark.parametrize("kw", [
    pytest.param(dict(causal=True), id="causal"),
    pytest.param(dict(window_size=(5, 3), softcap=2.0), id="window-softcap"),
    pytest.param(dict(sinks=True), id="sinks"),
])
def test_attention_lse_gradient(kw):
    q, k, v = rand(1, 4, 37, 16, grad=True), rand(1, 2, 45, 16, grad=True, seed=2), rand(1, 2, 45, 16, grad=True,
                                                                                             seed=3)
    if kw.pop("sinks", False):
        kw["sinks"] = rand(4, grad=True, seed=4)
    inputs = (q, k, v) + ((kw.pop("sinks"),) if "sinks" in kw else ())
    sink = (lambda s: dict(sinks=s)) if len(inputs) == 4 else (lambda *s: {})
    got = grads_of(lambda q, k, v, *s: fused_attn.attention(q, k, v, return_lse=True, **sink(*s), **kw), inputs)
    want = grads_of(lambda q, k, v, *s: reference.attention(q, k, v, return_lse=True, upcast=F64, **sink(*s), **kw),
                    inputs)
    pt = grads_of(lambda q, k, v, *s: reference.attention(q, k, v, return_lse=True, upcast=torch.float32,
                                                          **sink(*s), **kw), inputs)
    for g, w, p in zip(got, want, pt):
        assert_close(g, w, p)


def test_lse_alone_carries_the_gradient():
    """A loss of the lse only: the output gets no gradient (autograd passes none) and q, k still get theirs."""
    q, k, v = rand(1, 2, 20, 16, grad=True), rand(1, 2, 20, 16, grad=True, seed=2), rand(1, 2, 20, 16, seed=3)
    _, lse = fused_attn.attention(q, k, v, causal=True, return_lse=True)
    dq, dk = torch.autograd.grad(lse.sum(), (q, k))
    _, ref = reference.attention(q, k, v, causal=True, return_lse=True, upcast=F64)
    rq, rk = torch.autograd.grad(ref.sum(), (q, k))
    assert (dq.double() - rq).abs().max() < 1e-5 and (dk.double() - rk).abs().max() < 1e-5


def test_flex_halves_merged_by_their_lse():
    """PyTorch's test_lse_masked_output: two complementary block masks, merged by their lse, give the full
    attention's output and gradients."""
    q, k, v = (rand(1, 2, 64, 16, grad=True, seed=s) for s in (1, 2, 3))
    first = fused_attn.create_block_mask(lambda b, h, i, j: j < 32, 1, 1, 64, 64, device=DEVICE, BLOCK_SIZE=16)
    second = fused_attn.create_block_mask(lambda b, h, i, j: j >= 32, 1, 1, 64, 64, device=DEVICE, BLOCK_SIZE=16)
    (o1, l1), (o2, l2) = (fused_attn.flex_attention(q, k, v, block_mask=m, return_lse=True) for m in (first, second))
    lse = torch.logaddexp(l1, l2)
    merged = o1 * (l1 - lse).exp()[..., None] + o2 * (l2 - lse).exp()[..., None]
    w = rand(*merged.shape, seed=9)
    got = torch.autograd.grad((merged * w).sum(), (q, k, v))
    want = torch.autograd.grad((reference.attention(q, k, v, upcast=F64) * w).sum(), (q, k, v))
    for g, r in zip(got, want):
        assert (g.double() - r).abs().max() < 1e-5


# ---- PyTorch BlockMasks: their lists are the mask, converted once per object

def test_torch_from_kv_blocks_lists_are_the_mask():
    from torch.nn.attention.flex_attention import BlockMask as TorchBlockMask
    q, k, v = (rand(1, 2, 100, 16, seed=s) for s in (1, 2, 3))
    num = torch.tensor([1, 2, 1, 3], dtype=torch.int32).expand(1, 2, 4).contiguous()
    idx = torch.tensor([[0, 0, 0, 0], [0, 2, 0, 0], [3, 0, 0, 0], [0, 1, 3, 0]], dtype=torch.int32)
    idx = idx.expand(1, 2, 4, 4).contiguous()
    full_num, full_idx = torch.tensor([0, 0, 1, 0], dtype=torch.int32).expand(1, 2, 4).contiguous(), torch.zeros_like(idx)
    causal = (lambda b, h, i, j: i >= j)
    tm = TorchBlockMask.from_kv_blocks(num.to(DEVICE), idx.to(DEVICE), full_num.to(DEVICE), full_idx.to(DEVICE),
                                       BLOCK_SIZE=32, mask_mod=causal, seq_lengths=(100, 100))
    listed = torch.zeros(4, 4, dtype=torch.bool)
    for r in range(4):
        listed[r, idx[0, 0, r, :num[0, 0, r]].long()] = True
    blocks = torch.arange(100) // 32
    i, j = torch.arange(100)[:, None], torch.arange(100)[None, :]
    dense = (listed[blocks][:, blocks] & (i >= j)) | (blocks[:, None] == 2) & (blocks[None, :] == 0)
    want = reference.attention(q, k, v, attn_mask=dense.to(DEVICE), upcast=F64)
    for mask in (tm, fused_attn.BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=32,
                                                         mask_mod=causal, seq_lengths=(100, 100))):
        assert (fused_attn.flex_attention(q, k, v, block_mask=mask).double() - want).abs().max() < 1e-5


def test_torch_block_mask_converted_once_per_object():
    from torch.nn.attention.flex_attention import create_block_mask
    calls = []

    def causal(b, h, i, j):
        calls.append(1)
        return i >= j
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tm = create_block_mask(causal, 1, 1, 64, 64, device=DEVICE, BLOCK_SIZE=32)
    q = rand(1, 2, 64, 16)
    n = len(calls)
    first = fused_attn.flex_attention(q, q, q, block_mask=tm)
    converted = len(calls)
    assert converted > n and torch.equal(fused_attn.flex_attention(q, q, q, block_mask=tm), first)
    assert len(calls) == converted and as_block_mask(tm) is as_block_mask(tm)
    held = len(_converted)
    del tm
    gc.collect()
    assert len(_converted) == held - 1  # the cache entry goes with the PyTorch mask


def test_block_mask_fields_index_and_device():
    """PyTorch's fields read back from ours (partial and full lists), __getitem__ keeps each row's mask, .to()."""
    docs = (lambda b, h, i, j: (i // 24 == j // 24) & ((b == 0) | (i >= j)))
    bm = fused_attn.create_block_mask(docs, 2, 1, 64, 64, device=DEVICE, BLOCK_SIZE=16)
    rebuilt = fused_attn.BlockMask.from_kv_blocks(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks,
                                                  bm.full_kv_indices, BLOCK_SIZE=16, mask_mod=docs,
                                                  seq_lengths=(64, 64))
    assert torch.equal(rebuilt.to_dense(), bm.to_dense())
    q, k, v = (rand(2, 2, 64, 16, seed=s) for s in (1, 2, 3))
    out = fused_attn.flex_attention(q, k, v, block_mask=bm)
    assert torch.equal(fused_attn.flex_attention(q[1:], k[1:], v[1:], block_mask=bm[1]), out[1:])
    assert bm[1].shape == (1, 1, 64, 64) and bm.to(DEVICE).to_dense().equal(bm.to_dense())
    assert torch.equal(fused_attn.flex_attention(q, k, v, block_mask=rebuilt), out)


def test_key_value_batch_of_one_serves_every_query_batch():
    q = rand(3, 2, 20, 16, grad=True)
    k, v = rand(1, 2, 25, 16, grad=True, seed=2), rand(1, 2, 25, 16, grad=True, seed=3)
    out = fused_attn.flex_attention(q, k, v)
    want = reference.attention(q, k.expand(3, -1, -1, -1), v.expand(3, -1, -1, -1), upcast=F64)
    assert (out.double() - want).abs().max() < 1e-5
    got = torch.autograd.grad(out.sum(), (k, v))
    ref = torch.autograd.grad(want.sum(), (k, v))
    assert all(g.shape == (1, 2, 25, 16) and (g.double() - r).abs().max() < 1e-5 for g, r in zip(got, ref))


def test_float_mask_mod_is_refused():
    with pytest.raises(TypeError, match="must return a bool tensor, got dtype torch.float32"):
        fused_attn.create_block_mask(lambda b, h, i, j: (i >= j).float(), 1, 1, 32, 32, device=DEVICE)


# ---- autograd: by what requires grad, not by the shape; tensors the backward reads are version-checked

def test_trainable_sinks_with_frozen_inputs_on_a_decode_shaped_call():
    q, k, v = rand(1, 4, 1, 16), rand(1, 2, 300, 16, seed=2), rand(1, 2, 300, 16, seed=3)
    assert kernels.wants_split(1, 4, 1, 300, q.device)  # without the sinks' grad this shape takes split-KV
    sinks = rand(4, grad=True, seed=4)
    (got,) = torch.autograd.grad(fused_attn.attention(q, k, v, sinks=sinks).sum(), sinks)
    (want,) = torch.autograd.grad(reference.attention(q, k, v, sinks=sinks, upcast=F64).sum(), sinks)
    assert (got.double() - want).abs().max() < 1e-5


@pytest.mark.parametrize("what", ["attn_mask", "alibi_slopes"])
def test_tensors_the_backward_reads_edited_in_place_raise(what):
    q = rand(1, 2, 20, 16, grad=True)
    x = rand(1, 2, 20, 20, seed=5) if what == "attn_mask" else torch.rand(2, device=DEVICE)
    out = fused_attn.attention(q, q.detach(), q.detach(), **{what: x})
    x.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


# ---- FlashAttention-2's S_dmask: dropped probabilities negated

def test_flash_attn_func_s_dmask_sign_is_the_keep_mask():
    q, k, v = rand(2, 17, 4, 16, grad=True), rand(2, 23, 2, 16, seed=2), rand(2, 23, 2, 16, seed=3)
    torch.manual_seed(11)
    out, lse, s_dmask = fused_attn.flash_attn_func(q, k, v, dropout_p=0.3, causal=True, return_attn_probs=True)
    after = torch.rand(3)
    torch.manual_seed(11)
    assert torch.equal(out, fused_attn.flash_attn_func(q, k, v, dropout_p=0.3, causal=True))
    assert torch.equal(torch.rand(3), after)  # the generator ends where a plain call leaves it
    # FA2's test: keep = S_dmask >= 0, probabilities = S_dmask.abs()
    keep = s_dmask >= 0
    want, want_p = reference.attention(q, k, v, causal=True, layout="bshd", dropout_p=0.3, dropout_mask=keep,
                                       return_probs=True, upcast=F64)
    assert (out.double() - want).abs().max() < 1e-5 and (s_dmask.abs().double() - want_p).abs().max() < 1e-5
    assert (s_dmask < 0).any() and (s_dmask > 0).any()


def test_flash_attn_varlen_func_s_dmask_sign_is_the_keep_mask():
    cu = torch.tensor([0, 7, 20], dtype=torch.int32, device=DEVICE)
    q = rand(20, 2, 16)
    torch.manual_seed(4)
    out, _, s_dmask = fused_attn.flash_attn_varlen_func(q, q, q, cu, cu, 13, 13, dropout_p=0.4,
                                                        return_attn_probs=True)
    torch.manual_seed(4)
    keep = fused_attn.dropout_mask(2, 2, 13, 13, 0.4, device=DEVICE)
    seen = s_dmask != 0
    assert torch.equal((s_dmask > 0)[seen], keep[seen]) and (s_dmask < 0).any()


# ---- the split plan follows the batch; the output keeps the query's memory order

def test_num_splits_zero_does_not_split_a_batch_that_fills_the_gpu():
    q, kc, vc = rand(8, 1, 2, 16), rand(8, 300, 2, 16, seed=2), rand(8, 300, 2, 16, seed=3)
    for batch, splits in ((1, True), (8, False)):
        before = kernels.launches["_attn_combine_kernel"]
        fused_attn.attention_with_kvcache(q[:batch], kc[:batch], vc[:batch])
        assert (kernels.launches["_attn_combine_kernel"] > before) == splits


@pytest.mark.parametrize("fn", ["attention", "flex"])
def test_output_keeps_the_query_memory_order(fn):
    call = fused_attn.attention if fn == "attention" else fused_attn.flex_attention
    q = rand(2, 9, 3, 16).transpose(1, 2)  # (B, H, S, D) indexed, (B, S, H, D) in memory
    k, v = rand(2, 3, 11, 16, seed=2), rand(2, 3, 11, 16, seed=3)
    out = call(q, k, v)
    assert out.transpose(1, 2).is_contiguous() and torch.equal(out, call(q.contiguous(), k, v))


# ---- no host sync in classifying a per-call mask (CUDA graphs)

@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_attn_mask_classification_makes_no_host_sync(dtype):
    from fused_attn._args import kernel_args
    from fused_attn.function import masked
    from fused_attn.kernels import Modifiers
    q = rand(2, 2, 40, 16)
    mask = rand(2, 1, 40, 40, seed=6) > 0
    if dtype != torch.bool:
        mask = torch.zeros(mask.shape, device=DEVICE).masked_fill(~mask, float("-inf"))
    a = kernel_args(q, q, q, causal=True)
    with Syncs() as syncs:
        masked(a, Modifiers(), mask)
    assert syncs.seen == []
    got = fused_attn.attention(q, q, q, causal=True, attn_mask=mask)
    assert (got.double() - reference.attention(q, q, q, causal=True, attn_mask=mask, upcast=F64)).abs().max() < 1e-5
