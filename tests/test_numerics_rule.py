"""The rule's own terms on hand-made values (a broken judge must not pass silently)."""
import torch

from fused_attn.numerics import Metric, rounding_floor


def test_floor_is_at_least_one_ulp_of_the_largest_value():
    """A single value that rounds exactly in the dtype left the old floor ~0 (found by the property test: one cached
    key, fp32): one ulp is the least noise any arithmetic in that dtype has."""
    ref = torch.tensor([2.1752188224033384], dtype=torch.float64)
    assert rounding_floor(ref, torch.float32) >= torch.finfo(torch.float32).eps * 2.1752188224033384
    got = ref + 2.365871401011077e-07  # the kernel's lse there: one fp32 ulp off
    assert Metric.measure(got, ref, ref, torch.float32, 2.0).ok
    assert not Metric.measure(ref + 1e-5, ref, ref, torch.float32, 2.0).ok  # 40 ulps is not noise


def test_floor_of_many_values_is_fa3s_term():
    ref = torch.linspace(-3, 3, 1001, dtype=torch.float64)
    fa3 = 2 * ((ref.half() + 0.3 - 0.3).double() - ref).abs().max().item()
    assert rounding_floor(ref, torch.float16) == max(fa3, torch.finfo(torch.float16).eps * 3)
    assert rounding_floor(torch.tensor([float("-inf")]), torch.float32) == 0.0


def test_non_finite_results_fail():
    ref = torch.zeros(3, dtype=torch.float64)
    assert not Metric.measure(torch.tensor([0.0, float("nan"), 0.0]), ref, ref, torch.float32, 2.0).ok
    lse = torch.tensor([float("-inf"), 1.0], dtype=torch.float64)
    assert not Metric.measure(torch.tensor([0.0, 1.0]), lse, lse, torch.float32, 2.0).ok  # -inf where ref has it
