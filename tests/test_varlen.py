"""Packed variable-length batches (attention_varlen): each sequence against the float64 reference run on it alone,
and bitwise against the dense kernels on it alone; rows nothing reaches; determinism; invalid inputs."""
import pytest
import torch

import fused_attn
from fused_attn import cu_seqlens
from fused_attn.testing import VarlenCase, evaluate_varlen, make_varlen_inputs

ON_GPU = torch.cuda.is_available()
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32

# (seqlens_q, seqlens_k): lengths 0, 1, 17, under a tile, exactly a tile (32 under the interpreter), 300;
# Sq_b > Sk_b and Sq_b < Sk_b; a sequence with keys and no queries, sequences with queries and no keys.
SEQS = [
    pytest.param(((17, 0, 1, 32, 45), (17, 5, 30, 32, 20)), id="mixed"),
    pytest.param(((300, 33), (300, 64)), id="long"),
    pytest.param(((20, 7, 9), (0, 12, 0)), id="no-keys"),
]
MASKS = [
    pytest.param((False, (-1, -1)), id="full"),
    pytest.param((True, (-1, -1)), id="causal"),
    pytest.param((True, (7, -1)), id="causal-win7"),
    pytest.param((False, (16, 8)), id="win16-8"),
]


def check(case, device, grad=True):
    res = evaluate_varlen(case, device, grad=grad)
    assert res.launches.get("fwd") == 1 and res.launches.get("bwd", 0) == (1 if grad else 0), res.launches
    assert res.ok, res.describe()
    return res


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("seqs", SEQS)
def test_sequences_and_masks(seqs, mask, device):
    (lq, lk), (causal, window) = seqs, mask
    check(VarlenCase(lq, lk, 2, 1, 64, causal=causal, window=window, tail=3), device)


@pytest.mark.parametrize("case", [
    pytest.param(VarlenCase((40, 1, 70), (50, 33, 20), 3, 3, 40, causal=True), id="mha-d40"),
    pytest.param(VarlenCase((40, 1, 70), (50, 33, 20), 4, 1, 128, dtype=F32, window=(9, 3)), id="mqa-d128-fp32"),
    pytest.param(VarlenCase((33, 64), (64, 17), 2, 1, 256, causal=True), id="gqa-d256"),
    pytest.param(VarlenCase((31, 50), (45, 50), 4, 2, 72, 40, window=(5, 5), strided=True), id="strided-d72-dv40"),
    pytest.param(VarlenCase((25, 18), (25, 60), 2, 2, 32, dtype=F32, causal=True, scale=0.3), id="scale"),
] + ([pytest.param(VarlenCase((700, 1, 333, 1024), (700, 900, 333, 1000), 8, 2, 128, dtype=BF16, causal=True),
                   id="bf16-gpu")] if ON_GPU else []))
def test_heads_dims_dtypes(case, device):
    check(case, device)


@pytest.mark.parametrize("mask", [pytest.param((True, (-1, -1)), id="causal"),
                                  pytest.param((False, (6, 3)), id="win6-3")])
def test_equals_dense_kernels_per_sequence(mask, device):
    """Each sequence's slice of out, lse and the gradients is bitwise the dense kernels' result on that sequence
    alone: the same tiles, the same inner loops, only the prologue differs."""
    causal, window = mask
    case = VarlenCase((45, 1, 64, 9), (30, 64, 64, 40), 4, 2, 48)
    q, k, v, do, cu_q, cu_k = make_varlen_inputs(case, device)
    out, lse = fused_attn.attention_varlen(q, k, v, cu_q, cu_k, 64, 64, causal=causal, window_size=window,
                                           return_lse=True)
    grads = torch.autograd.grad(out, (q, k, v), do)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for q0, q1, k0, k1 in zip(cq, cq[1:], ck, ck[1:]):
        qb, kb, vb = (t[None, a:b].detach().requires_grad_() for t, a, b in ((q, q0, q1), (k, k0, k1), (v, k0, k1)))
        ob, lb = fused_attn.attention(qb, kb, vb, causal=causal, window_size=window, layout="bshd", return_lse=True)
        gb = torch.autograd.grad(ob, (qb, kb, vb), do[None, q0:q1])
        assert torch.equal(ob[0], out[q0:q1]) and torch.equal(lb[0], lse[:, q0:q1])
        for g, whole, (a, b) in zip(gb, grads, ((q0, q1), (k0, k1), (k0, k1))):
            assert torch.equal(g[0], whole[a:b])


def test_backward_is_deterministic(device):
    repeats = 20 if ON_GPU else 2
    case = VarlenCase((100, 3, 64), (80, 64, 70), 2, 1, 64, causal=True)
    q, k, v, do, cu_q, cu_k = make_varlen_inputs(case, device)
    first = None
    for _ in range(repeats):
        out = fused_attn.attention_varlen(q, k, v, cu_q, cu_k, 100, 80, causal=True)
        results = (out, *torch.autograd.grad(out, (q, k, v), do))
        first = first or results
        for a, b in zip(first, results):
            assert torch.equal(a, b)


def test_every_row_written(device):
    """NaN-poisoned buffers: the launchers write every row some sequence covers (the ops pre-fill the rest)."""
    from fused_attn import kernels
    from fused_attn.kernels import Packed
    case = VarlenCase((23, 40), (50, 40), 2, 1, 32, dtype=F32, causal=True)
    q, k, v, do, cu_q, cu_k = (t.detach() for t in make_varlen_inputs(case, device))
    view = (lambda t: t.unsqueeze(0).transpose(1, 2))
    q4, k4, v4, do4 = (view(t) for t in (q, k, v, do))
    nan, total = float("nan"), q.shape[0]
    out = view(torch.full_like(q, nan))
    lse, stats = torch.full((1, 2, total), nan, device=device), torch.full((1, 2, total, 2), nan, device=device)
    packed = Packed(cu_q, cu_k, 40, 50)
    kernels.attention_forward(q4, k4, v4, out, lse, stats, 32 ** -0.5, 0, -1, 0, packed=packed)
    dq, dk, dv = (view(torch.full_like(t, nan)) for t in (q, k, v))
    kernels.attention_backward(do4, q4, k4, v4, out, stats, dq, dk, dv, torch.full_like(lse, nan), 32 ** -0.5, 0,
                               -1, 0, packed=packed)
    for t in (out, lse, stats, dq, dk, dv):
        assert not torch.isnan(t).any()


def test_launch_counter_counts_only_launched_kernels(device):
    """No query rows at all (max_seqlen_q = 0): the forward has nothing to launch, and the counter that the tests'
    proofs of "the kernels ran" read must not move; a call with rows moves it by one per kernel."""
    from fused_attn import kernels
    q, k = torch.randn(4, 2, 16, device=device), torch.randn(9, 2, 16, device=device)
    before = kernels.launches.copy()
    out = fused_attn.attention_varlen(q, k, k, cu_seqlens([0, 0], device), cu_seqlens([5, 4], device), 0, 5)
    assert kernels.launches == before and torch.equal(out, torch.zeros_like(out))
    fused_attn.attention_varlen(q, k, k, cu_seqlens([2, 2], device), cu_seqlens([5, 4], device), 2, 5)
    assert kernels.launches - before == {"fwd": 1, "fwd:ptr": 1, "_attn_fwd_kernel": 1}


def test_output_shapes_and_layout(device):
    case = VarlenCase((5, 9), (7, 3), 4, 2, 32, 16)
    q, k, v, _, cu_q, cu_k = make_varlen_inputs(case, device)
    out, lse = fused_attn.attention_varlen(q, k, v, cu_q, cu_k, 9, 7, return_lse=True)
    assert out.shape == (14, 4, 16) and out.is_contiguous() and out.dtype == F16
    assert lse.shape == (4, 14) and lse.dtype == F32


def test_reference_checks_cu_seqlens_values():
    q = torch.randn(10, 2, 16)
    with pytest.raises(ValueError, match=r"cu_seqlens_k\[-1\] = 11 is beyond the 10 rows of k"):
        fused_attn.reference.attention_varlen(q, q, q, cu_seqlens([4, 6], "cpu"), cu_seqlens([4, 7], "cpu"))


def t3(rows, heads=2, dim=16, dtype=F16, device=None):
    return torch.randn(rows, heads, dim).to(device=device or ("cuda" if ON_GPU else "cpu"), dtype=dtype)


CU = cu_seqlens([4, 6], "cuda" if ON_GPU else "cpu")


@pytest.mark.parametrize("args,exc,match", [
    pytest.param((t3(10)[None], t3(10), t3(10), CU, CU, 6, 6), ValueError, r"q must be 3-D \(total, H, D\)",
                 id="rank"),
    pytest.param((t3(10), t3(10, dim=8), t3(10), CU, CU, 6, 6), ValueError, r"head dims differ \(16 vs 8\)",
                 id="head-dim"),
    pytest.param((t3(10, heads=3), t3(10), t3(10), CU, CU, 6, 6), ValueError, r"\(3\) must be a multiple of .*\(2\)",
                 id="gqa"),
    pytest.param((t3(10), t3(10), t3(10, dtype=F32), CU, CU, 6, 6), TypeError, "share one dtype", id="dtype"),
    pytest.param((t3(10), t3(10), t3(10), CU.long(), CU, 6, 6), TypeError, "cu_seqlens_q must be int32, got "
                 "torch.int64", id="cu-dtype"),
    pytest.param((t3(10), t3(10), t3(10), [0, 4, 10], CU, 6, 6), TypeError, "cu_seqlens_q must be a torch.Tensor",
                 id="cu-list"),
    pytest.param((t3(10), t3(10), t3(10), CU[None], CU, 6, 6), ValueError, r"cu_seqlens_q must be 1-D", id="cu-rank"),
    pytest.param((t3(10), t3(10), t3(10), CU, CU[:2], 6, 6), ValueError, "same length", id="cu-lengths"),
    pytest.param((t3(10), t3(10), t3(10), CU, CU, 6, -1), ValueError, "max_seqlen_k must be >= 0, got -1",
                 id="max-negative"),
    pytest.param((t3(10), t3(10), t3(10), CU, CU, 6.0, 6), TypeError, "max_seqlen_q must be an int", id="max-float"),
    pytest.param((t3(10), t3(10), t3(10), CU, CU, None, 6), TypeError, "max_seqlen_q must be an int .* got None",
                 id="max-q-none"),
    pytest.param((t3(10), t3(10), t3(10), CU, CU, 6, None), TypeError, "max_seqlen_k must be an int .* got None",
                 id="max-k-none"),
    pytest.param((t3(10), t3(10), t3(10), CU, CU, 6, 6, True), TypeError, "positional", id="causal-positional"),
])
def test_invalid_inputs(args, exc, match):
    with pytest.raises(exc, match=match):
        fused_attn.attention_varlen(*args)


@pytest.mark.parametrize("cu_q,max_q,match", [
    pytest.param([1, 4, 10], 6, r"cu_seqlens_q\[0\] must be 0, got 1", id="start"),
    pytest.param([0, 7, 6], 7, r"non-decreasing: cu_seqlens_q\[2\] = 6 < cu_seqlens_q\[1\] = 7", id="decreasing"),
    pytest.param([0, 4, 11], 7, r"cu_seqlens_q\[-1\] = 11 is beyond the 10 rows of q", id="beyond-total"),
    pytest.param([0, 4, 10], 5, "sequence 1 has 6 rows by cu_seqlens_q, more than max_seqlen 5", id="max-too-small"),
])
def test_invalid_cu_seqlens_values_on_cpu(cu_q, max_q, match):
    """The values are read where that costs no device synchronisation: CPU tensors (the interpreter)."""
    q = torch.randn(10, 2, 16)
    with pytest.raises(ValueError, match=match):
        fused_attn.reference.attention_varlen(q, q, q, torch.tensor(cu_q, dtype=torch.int32), cu_seqlens([4, 6], "cpu"),
                                              max_q, 6)
    if not ON_GPU:
        with pytest.raises(ValueError, match=match):
            fused_attn.attention_varlen(q.half(), q.half(), q.half(), torch.tensor(cu_q, dtype=torch.int32),
                                        cu_seqlens([4, 6], "cpu"), max_q, 6)
