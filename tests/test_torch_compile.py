"""torch.library ops behind the autograd Function: opcheck, and a fullgraph torch.compile of fwd + bwd."""
import pytest
import torch

import fused_attn
from fused_attn import kernels, ops
from fused_attn.testing import Case, make_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_opcheck(layout):
    q, k, v, do = make_inputs(Case(1, 4, 2, 40, 56, 32, 16, layout=layout, dtype=torch.float32), DEVICE)
    view = (lambda t: t.detach().transpose(1, 2)) if layout == "bshd" else (lambda t: t.detach())
    q, k, v, do = (view(t) for t in (q, k, v, do))
    args = (q, k, v, 32 ** -0.5, 16, 10, 0)
    torch.library.opcheck(ops.forward, args, dict(layout=layout))
    out, lse, stats, rng = ops.forward(*args, layout=layout)
    assert out.shape == (1, 4, 40, 16) and (layout == "bhsd") == out.is_contiguous() and rng.numel() == 0
    torch.library.opcheck(ops.backward, (do, q, k, v, out, stats, 32 ** -0.5, 16, 10, 0))


def test_opcheck_modifiers():
    """softcap and ALiBi through the ops (dropout draws random numbers: opcheck's repeated runs would differ)."""
    q, k, v, do = (t.detach() for t in make_inputs(Case(1, 4, 2, 40, 56, 32, dtype=torch.float32), DEVICE))
    slopes = torch.rand(4, device=DEVICE)
    args, mods = (q, k, v, 32 ** -0.5, 16, -1, 0), dict(softcap=2.0, alibi_slopes=slopes)
    torch.library.opcheck(ops.forward, args, mods)
    out, lse, stats, rng = ops.forward(*args, **mods)
    torch.library.opcheck(ops.backward, (do, q, k, v, out, stats, 32 ** -0.5, 16, -1, 0), dict(mods, rng=rng))


def test_opcheck_bias_and_sinks():
    """A float bias (an expanded view, with its gradient) and sinks through the ops: real and fake implementations
    agree (shapes, strides, dtypes of every output, the gradients' included)."""
    q, k, v, do = (t.detach() for t in make_inputs(Case(1, 4, 2, 40, 56, 32, dtype=torch.float32), DEVICE))
    bias = torch.randn(4, 40, 56, device=DEVICE)[None].expand(1, 4, 40, 56)
    sinks = torch.randn(4, device=DEVICE)
    args = (q, k, v, 32 ** -0.5, 16, -1, -1)
    torch.library.opcheck(ops.forward, args, dict(bias=bias, sinks=sinks))
    out, lse, stats, rng = ops.forward(*args, bias=bias, sinks=sinks)
    grads = ops.backward(do, q, k, v, out, stats, 32 ** -0.5, 16, -1, -1, rng=rng, bias=bias, bias_grad=True,
                         sinks=sinks)
    assert grads[3].shape == (1, 4, 40, 56) and grads[4].shape == (4,)
    torch.library.opcheck(ops.backward, (do, q, k, v, out, stats, 32 ** -0.5, 16, -1, -1),
                          dict(rng=rng, bias=bias, bias_grad=True, sinks=sinks))


def check_fullgraph(loss_fn, q, k, v, do):
    """loss_fn compiled with fullgraph=True (any graph break fails) runs one forward and one backward launch
    (AOTAutograd compiles the backward graph, our backward op, too) and gives eager's gradients exactly (from the
    same generator state, for dropout)."""
    torch._dynamo.reset()

    def grads(fn):
        torch.manual_seed(11)
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v, do).backward()
        return [t.grad.clone() for t in (q, k, v)]

    backend = "inductor" if torch.cuda.is_available() else "aot_eager"  # CPU: no C++ build in the suite
    compiled = torch.compile(loss_fn, fullgraph=True, backend=backend)
    before = kernels.launches.copy()
    got = grads(compiled)
    assert kernels.launches["fwd"] == before["fwd"] + 1 and kernels.launches["bwd"] == before["bwd"] + 1
    for a, b in zip(got, grads(loss_fn)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fullgraph_compile_of_forward_and_backward():
    def loss_fn(q, k, v, do):
        out = fused_attn.attention(q, k, v, window_size=(20, 0)) * 2.0
        return (out * do).sum()
    check_fullgraph(loss_fn, *make_inputs(Case(2, 4, 2, 50, 70, 32, dtype=torch.float32), DEVICE))


def test_fullgraph_compile_with_modifiers():
    slopes = torch.rand(2, 4, device=DEVICE)

    def loss_fn(q, k, v, do):
        out = fused_attn.attention(q, k, v, causal=True, softcap=3.0, alibi_slopes=slopes, dropout_p=0.2)
        return (out * do).sum()
    check_fullgraph(loss_fn, *make_inputs(Case(2, 4, 2, 50, 70, 32, dtype=torch.float32), DEVICE))


def test_fullgraph_compile_with_sinks():
    """Sinks with their gradient trace through the ops (a float attn_mask does not: classifying its blocks reads
    its values, a graph break)."""
    sinks = torch.randn(4, device=DEVICE, requires_grad=True)

    def loss_fn(q, k, v, do):
        return (fused_attn.attention(q, k, v, causal=True, sinks=sinks) * do).sum()
    check_fullgraph(loss_fn, *make_inputs(Case(2, 4, 2, 50, 70, 32, dtype=torch.float32), DEVICE))


def _packed_inputs():
    from fused_attn.testing import VarlenCase, make_varlen_inputs
    return make_varlen_inputs(VarlenCase((20, 0, 33), (25, 9, 30), 4, 2, 32, 16, dtype=torch.float32, tail=2),
                              DEVICE)


def test_opcheck_packed():
    q, k, v, do, cu_q, cu_k = (t.detach() for t in _packed_inputs())
    view = (lambda t: t.unsqueeze(0).transpose(1, 2))
    q, k, v, do = (view(t) for t in (q, k, v, do))
    packed = (cu_q, cu_k, 33, 30)
    args = (q, k, v, 32 ** -0.5, 0, -1, 0) + packed
    torch.library.opcheck(ops.forward, args, dict(layout="bshd"))
    out, lse, stats, _ = ops.forward(*args, layout="bshd")
    torch.library.opcheck(ops.backward, (do, q, k, v, out, stats, 32 ** -0.5, 0, -1, 0) + packed)


def test_fullgraph_compile_of_packed_forward_and_backward():
    q, k, v, do, cu_q, cu_k = _packed_inputs()

    def loss_fn(q, k, v, do):
        out = fused_attn.attention_varlen(q, k, v, cu_q, cu_k, 33, 30, causal=True)
        return (out * do).sum()
    check_fullgraph(loss_fn, q, k, v, do)
