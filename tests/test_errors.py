"""Every invalid input gets a ValueError / TypeError naming the bad value."""
import os
import subprocess
import sys

import pytest
import torch

import fused_attn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def t(*shape, dtype=torch.float16, device=DEVICE):
    return torch.randn(*shape, device=device).to(dtype)


Q, K, V = (1, 4, 16, 32), (1, 2, 20, 32), (1, 2, 20, 24)


@pytest.mark.parametrize("args,kwargs,exc,match", [
    pytest.param((t(4, 16, 32), t(*K), t(*V)), {}, ValueError, r"q must be 4-D .* got shape \(4, 16, 32\)", id="rank"),
    pytest.param((t(*Q), t(2, 2, 20, 32), t(*V)), {}, ValueError, "batch sizes differ", id="batch"),
    pytest.param((t(*Q), t(1, 2, 20, 16), t(*V)), {}, ValueError, r"head dims differ \(32 vs 16\)", id="head-dim"),
    pytest.param((t(*Q), t(*K), t(1, 2, 21, 24)), {}, ValueError, "same heads and sequence length", id="seqlen-kv"),
    pytest.param((t(1, 3, 16, 32), t(*K), t(*V)), {}, ValueError, r"\(3\) must be a multiple of .* \(2\)", id="gqa"),
    pytest.param((t(1, 4, 16, 257), t(1, 2, 20, 257), t(*V)), {}, ValueError, "D = 257", id="d>256"),
    pytest.param((t(*Q), t(*K), t(1, 2, 20, 300)), {}, ValueError, "Dv = 300", id="dv>256"),
    pytest.param((t(*Q, dtype=torch.float64), t(*K, dtype=torch.float64), t(*V, dtype=torch.float64)), {},
                 TypeError, "unsupported dtype torch.float64", id="dtype"),
    pytest.param((t(*Q), t(*K, dtype=torch.float32), t(*V)), {}, TypeError, "share one dtype", id="mixed-dtype"),
    pytest.param((t(*Q), t(*K), t(*V)), {"window_size": (-2, 0)}, ValueError, r"left must be >= -1 \(-1 = unbounded\), got -2",
                 id="window-left"),
    pytest.param((t(*Q), t(*K), t(*V)), {"window_size": (3, -5)}, ValueError, r"right must be >= -1 \(-1 = unbounded\), got -5",
                 id="window-right"),
    pytest.param((t(*Q), t(*K), t(*V)), {"window_size": (1.5, 0)}, TypeError, "left must be an int", id="window-type"),
    pytest.param((t(*Q), t(*K), t(*V)), {"window_size": 4}, TypeError, "pair", id="window-not-pair"),
    pytest.param((t(*Q), t(*K), t(*V)), {"causal": True, "window_size": (4, 2)}, ValueError, "causal=True means",
                 id="causal-vs-right"),
    pytest.param((t(*Q), t(*K), t(*V)), {"layout": "sbhd"}, ValueError, "layout must be one of", id="layout"),
    pytest.param((t(*Q), t(*K), t(*V)), {"scale": "x"}, TypeError, "scale must be", id="scale"),
    pytest.param((t(*Q), t(*K), t(*V)), {"scale": -0.5}, ValueError, "finite positive float, got -0.5",
                 id="scale-negative"),
    pytest.param((t(*Q), t(*K), t(*V)), {"causal": 1}, TypeError, "causal must be a bool", id="causal-type"),
    pytest.param((t(*Q).numpy() if DEVICE == "cpu" else None, t(*K), t(*V)), {}, TypeError, "q must be a torch.Tensor",
                 id="not-tensor"),
    pytest.param((t(1, 4, 0, 32), t(*K), t(*V)), {}, ValueError, "empty dimension", id="empty"),
])
def test_invalid_inputs(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fused_attn.attention(*args, **kwargs)
    if args[0] is not None and getattr(args[0], "dtype", None) == torch.float64:
        return  # the reference accepts float64 by design
    with pytest.raises(exc, match=match):  # the reference applies the same policy
        fused_attn.reference.attention(*args, **kwargs)


def test_unknown_keyword_is_rejected():
    with pytest.raises(TypeError):
        fused_attn.attention(t(*Q), t(*K), t(*V), casual=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA and a CPU device")
def test_mixed_devices():
    with pytest.raises(ValueError, match="one device"):
        fused_attn.attention(t(*Q), t(*K, device="cpu"), t(*V))


def test_cpu_without_interpreter_says_how_to_proceed():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import torch, fused_attn\n"
            "x = torch.randn(1, 1, 4, 16)\n"
            "try:\n    fused_attn.attention(x, x, x)\n"
            "except ValueError as e:\n    print('ValueError:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "ValueError:" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stdout + out.stderr


def test_slices_beyond_32_bit_offsets_are_refused(monkeypatch):
    import fused_attn._args as args
    q = t(1, 2, 64, 32, device=DEVICE)
    monkeypatch.setattr(args, "MAX_OFFSET", 64 * 32 - 2)  # stands in for 2**31 - 1
    with pytest.raises(ValueError, match=r"q spans 2047 elements .* 32-bit offsets"):
        fused_attn.attention(q, q, q)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_caches_beyond_32_bit_offsets_are_refused(paged):
    """The real limit, on meta tensors (no memory): a contiguous cache row of 2^22 keys x 16 heads x 64 spans more
    than 2^31 elements; a paged cache of the same capacity addresses one page at a time, and passes the check
    (then meets the device check)."""
    q = torch.empty(1, 1, 16, 64, device="meta", dtype=torch.float16)
    if paged:
        cache = torch.empty(2 ** 22 // 256, 256, 16, 64, device="meta", dtype=torch.float16)
        table = torch.zeros(1, 2 ** 22 // 256, dtype=torch.int32, device="meta")
        with pytest.raises(ValueError, match="supports CUDA tensors .* got device meta"):
            fused_attn.attention_with_kvcache(q, cache, cache, block_table=table)
        return
    cache = torch.empty(1, 2 ** 22, 16, 64, device="meta", dtype=torch.float16)
    with pytest.raises(ValueError, match=r"k spans \d+ elements .* 32-bit offsets"):
        fused_attn.attention_with_kvcache(q, cache, cache)


def test_long_sequences_beyond_32_bit_offsets_are_refused():
    q = torch.empty(1, 1, 2 ** 23 + 1, 256, device="meta", dtype=torch.float16)
    with pytest.raises(ValueError, match=r"q spans \d+ elements .* 32-bit offsets"):
        fused_attn.attention(q, q, q)
