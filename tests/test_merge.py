"""merge_attention: attention over disjoint key sets, merged by the log-sum-exps, equals attention over all keys."""
import pytest
import torch

import fused_attn
from fused_attn.numerics import FACTORS, Metric

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rand(*shape, dtype=torch.float16):
    return torch.randn(*shape, generator=rand.gen).to(DEVICE, dtype)


rand.gen = torch.Generator().manual_seed(0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("cuts", [(0, 40, 41, 97), (0, 64, 97)], ids=["three-parts-one-key", "two-parts"])
def test_parts_merge_to_the_whole(cuts, dtype):
    q, k, v = rand(1, 4, 33, 64, dtype=dtype), rand(1, 2, 97, 64, dtype=dtype), rand(1, 2, 97, 48, dtype=dtype)
    parts = [fused_attn.attention(q, k[:, :, a:b], v[:, :, a:b], return_lse=True) for a, b in zip(cuts, cuts[1:])]
    out, lse = fused_attn.merge_attention([o for o, _ in parts], [s for _, s in parts])
    ref, ref_lse = fused_attn.reference.attention(q, k, v, upcast=torch.float64, return_lse=True)
    pt = fused_attn.reference.attention(q, k, v, upcast=None)
    assert out.dtype == dtype and lse.dtype == torch.float32
    m = Metric.measure(out, ref, pt, dtype, FACTORS["out"])
    assert m.ok, m
    assert (lse.double() - ref_lse).abs().max() < 1e-5


def test_an_empty_part_adds_exactly_nothing_and_all_empty_rows_are_zero():
    o1, l1 = rand(2, 3, 5, 16, dtype=torch.float32), rand(2, 3, 5, dtype=torch.float32)
    l1[0, 1, 2] = float("-inf")  # this row is empty in part 1 ...
    o1[0, 1, 2] = 0.0
    o2 = torch.full_like(o1, float("nan"))  # ... and in part 2 everywhere, whose out must not be read
    l2 = torch.full_like(l1, float("-inf"))
    out, lse = fused_attn.merge_attention([o1, o2], [l1, l2])
    assert torch.equal(out, o1) and torch.equal(lse, l1)
    assert out[0, 1, 2].abs().max() == 0 and lse[0, 1, 2] == float("-inf")


def test_bad_parts_are_named():
    o, lse = torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3)
    cases = [
        (([o], []), ValueError, "one lse per partial output"),
        ((o, lse), TypeError, "sequences of tensors"),
        (([o, o[..., :2]], [lse, lse]), ValueError, r"part 1: out must be \(B, Hq, Sq, Dv\)"),
        (([o, o.half()], [lse, lse]), TypeError, "part 1: out dtype torch.float16"),
        (([o], [lse.double()]), TypeError, "part 0: lse must be float32"),
        (([o], [lse[..., :2]]), ValueError, r"part 0: lse must be \(B, Hq, Sq\)"),
    ]
    for (outs, lses), exc, match in cases:
        with pytest.raises(exc, match=match):
            fused_attn.merge_attention(outs, lses)
