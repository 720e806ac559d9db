"""Not one bit moves: the outputs of a fixed set of calls (out, lse, dq, dk, dv, dbias, dsinks, decode and serving
outputs), recorded under the interpreter into tests/golden_bits.json as SHA-256 digests of their bytes, are
compared bit for bit. A refactor of the call path or of the kernels' arguments must leave every digest as it is.

The bits depend on the machine's floating-point path (numpy's BLAS under the interpreter -- OpenBLAS picks its
kernels by the CPU's instruction sets, so two "AMD EPYC" machines can differ --, torch and Triton versions), so
the file holds one record per environment it was made in, and the test runs where one matches (it says why it
skipped elsewhere). Record this environment's entry (added, or replacing its old one), on purpose only and from
the code before a change, with

    python tests/test_golden_bits.py --record
"""
import hashlib
import json
import os
import platform
import sys
from pathlib import Path

if __name__ == "__main__" and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"  # before fused_attn defines its kernels (pytest: conftest sets it)

import numpy
import pytest
import torch
import triton

import fused_attn
from fused_attn.testing import make_kvcache_inputs, make_serving_inputs

FILE = Path(__file__).with_name("golden_bits.json")
F16, F32 = torch.float16, torch.float32


def environment() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    try:  # the vector instruction sets numpy (and its OpenBLAS) dispatch on
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:
        features = {}
    simd = sorted(f for f, on in features.items() if on and f.startswith(("AVX", "FMA")))
    return dict(torch=torch.__version__, triton=triton.__version__, numpy=numpy.__version__,
                machine=platform.machine(), cpu=cpu, simd=simd)


def digest(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes() + str((t.dtype, tuple(t.shape))).encode()).hexdigest()


def rand(*shape, dtype=F32, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).requires_grad_(grad)


def with_grads(fn, *inputs, seed=9):
    """fn(*inputs) -> (out, lse); the gradients of (out * w).sum() for the inputs that require grad."""
    out, lse = fn(*inputs)
    w = rand(*out.shape, dtype=out.dtype, seed=seed)
    grads = torch.autograd.grad((out * w).sum(), [t for t in inputs if t.requires_grad])
    return dict(out=out, lse=lse, **{f"d{i}": g for i, g in enumerate(grads)})


def dense():
    q, k, v = rand(1, 4, 37, 40, grad=True), rand(1, 2, 45, 40, seed=1, grad=True), rand(1, 2, 45, 24, seed=2,
                                                                                          grad=True)
    return with_grads(lambda q, k, v: fused_attn.attention(q, k, v, causal=True, return_lse=True), q, k, v)


def modifiers():
    q, k, v = (rand(2, 19, 2, 32, dtype=F16, seed=s, grad=True) for s in (3, 4, 5))
    sinks = rand(2, seed=6, grad=True)
    return with_grads(lambda q, k, v, s: fused_attn.attention(
        q, k, v, layout="bshd", window_size=(7, 2), softcap=5.0, alibi_slopes=torch.tensor([0.3, 0.1]), sinks=s,
        return_lse=True), q, k, v, sinks)


def dropout_and_bias():
    q, k, v = (rand(1, 2, 33, 16, seed=s, grad=True) for s in (7, 8, 9))
    bias = rand(2, 33, 33, seed=10, grad=True)
    torch.manual_seed(1234)
    return with_grads(lambda q, k, v, b: fused_attn.attention(q, k, v, attn_mask=b, dropout_p=0.2, return_lse=True),
                      q, k, v, bias)


def varlen():
    cu_q = torch.tensor([0, 20, 21, 50], dtype=torch.int32)
    cu_k = torch.tensor([0, 31, 40, 70], dtype=torch.int32)
    q, k, v = rand(50, 4, 16, seed=11, grad=True), rand(70, 1, 16, seed=12, grad=True), rand(70, 1, 16, seed=13,
                                                                                              grad=True)
    return with_grads(lambda q, k, v: fused_attn.attention_varlen(q, k, v, cu_q, cu_k, 29, 31, causal=True,
                                                                  return_lse=True), q, k, v)


def flex():
    q, k, v = (rand(1, 2, 64, 16, seed=s, grad=True) for s in (14, 15, 16))
    mask = fused_attn.create_block_mask(lambda b, h, i, j: (i // 20 == j // 20) & (i >= j), 1, 1, 64, 64,
                                        BLOCK_SIZE=16, device="cpu")
    return with_grads(lambda q, k, v: fused_attn.flex_attention(q, k, v, block_mask=mask, return_lse=True), q, k, v)


def decode():
    results = {}
    for page, splits in ((0, 0), (16, 3)):
        q, kc, vc, table, k, v = make_kvcache_inputs(3, 1, 4, 2, 16, 150, 1, F32, "cpu", page=page, seed=17)
        lens = torch.tensor([100, 149, 37], dtype=torch.int32)
        out, lse = fused_attn.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, block_table=table,
                                                     num_splits=splits, return_lse=True, causal=True)
        results.update({f"out-page{page}-splits{splits}": out, f"lse-page{page}-splits{splits}": lse,
                        f"cache-page{page}": kc})
    return results


def serving():
    q, kc, vc, cu, used, table = make_serving_inputs([20, 1, 3, 0, 1], [150, 130, 70, 9, 0], 4, 2, 16, F16, "cpu",
                                                     16, seed=18)
    out, lse = fused_attn.attention_varlen(q, kc, vc, cu, None, 20, 150, seqused_k=used, block_table=table,
                                           causal=True, return_lse=True, softcap=3.0)
    return dict(out=out, lse=lse)


CALLS = dict(dense=dense, modifiers=modifiers, dropout_and_bias=dropout_and_bias, varlen=varlen, flex=flex,
             decode=decode, serving=serving)


def record() -> dict:
    return dict(environment=environment(),
                calls={name: {k: digest(t) for k, t in fn().items()} for name, fn in CALLS.items()})


@pytest.mark.skipif(torch.cuda.is_available(), reason="recorded under the interpreter on the CPU")
@pytest.mark.parametrize("name", list(CALLS))
def test_bits_as_recorded(name):
    here = environment()
    golden = next((r for r in json.loads(FILE.read_text())["records"] if r["environment"] == here), None)
    if golden is None:
        pytest.skip(f"no record made in this environment ({here})")
    got = {k: digest(t) for k, t in CALLS[name]().items()}
    moved = sorted(k for k in golden["calls"][name] if got.get(k) != golden["calls"][name][k])
    assert set(got) == set(golden["calls"][name]) and not moved, f"{name}: bits moved in {moved}"


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit(__doc__)
    records = json.loads(FILE.read_text())["records"] if FILE.exists() else []
    records = [r for r in records if r["environment"] != environment()] + [record()]
    FILE.write_text(json.dumps(dict(records=records), indent=1, sort_keys=True) + "\n")
    print(f"wrote {FILE}: {len(records)} environments")
