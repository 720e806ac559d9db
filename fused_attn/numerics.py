"""FlashAttention's tolerance rule, the one judge of the kernels' numerics: the test suite, `python -m fused_attn
check`, the benchmarks' provider checks and the explorer all apply it (the cases that the suite and the check run
live in fused_attn/testing.py).

Rule: with ref = the reference in float64 and pt = the same naive computation in the input dtype,

    max|fused - ref| <= factor * max|pt - ref| + floor,   factor 2 for out / lse, 3 for gradients,

floor = 2 * max|(ref + 0.3 - 0.3) - ref| with the arithmetic in the input dtype (FlashAttention-3's rounding-noise
term, relative to the magnitude of ref), and at least one unit in the last place of max|ref| in that dtype: over a
few values (a decode step's single lse, say) the first term can come out ~0 because those values happen to round
exactly, and any rounding of the kernel's own -- one ulp -- would then fail against nothing.

One addition for dq and dk. FlashAttention's backward forms dS = P * (dP - delta) with delta = rowsum(dO * O) summed
in fp32, while PyTorch's softmax backward uses rowsum(P * dP). Where a row sees a single key the two cancel exactly
in PyTorch (pt error 0, ref 0) but only to fp32 rounding noise in the kernel. Their floor therefore adds that noise,
carried through to the gradient: 2 * eps32 * scale * max_id c_i sum_j P_ij |k_jd| for dq and
2 * eps32 * scale * max_jd sum_i P_ij c_i |q_id| for dk, with c_i = sum_d |dO_id O_id| (the magnitude of delta's
terms; for GQA the sum over i runs over the group's query heads too). A float bias's gradient is dS itself, summed
over the dimensions the bias broadcasts over: 2 * eps32 * max (P_ij c_i summed the same way). A sink's gradient
is -sum_i P_sink,i delta_i over its head's rows: 2 * eps32 * max_h sum_i P_sink,i c_i.

One for FP8 inputs (q, k, v in float8_e4m3fn / e5m2 with descales; ref and pt fed the dequantized tensors, pt in
bfloat16). The kernels round each probability p = exp(s - m) to FP8 for the P.V product, as FlashAttention-3 does
(m the running row max: p <= 1), which no reference reproduces; that rounding is the floor: a relative 2^-(mant+1)
of p, and an absolute half of the smallest subnormal 2^(emin-mant-1) (2^-4 and 2^-10 for e4m3, 2^-3 and 2^-17 for
e5m2), carried through the normalization and V: |out_id - ref_id| <= sum_j max(2^-(mant+1) P_ij,
2^(emin-mant-1) max_j P_ij) |v_jd| (P the final probabilities; max_j P_ij = 1 / l_i), maximized over (i, d)
(`fp8_p_floor`), on top of the rule with the output dtype's rounding floor.

One for attention weights rebuilt from the kernels' lse (`attention_probs`: P = exp(score - lse) in fp32, where
PyTorch's softmax subtracts the row max): the lse is a float32 of magnitude |lse| and the score it is subtracted
from as large, so P carries a relative fp32 rounding of about eps32 * |lse| from each. Their floor adds
2 * eps32 * max_ij P_ij |lse_i| (`lse_noise`).
"""
from dataclasses import dataclass

import torch

FACTORS = {"out": 2.0, "lse": 2.0, "dq": 3.0, "dk": 3.0, "dv": 3.0, "dbias": 3.0, "dsinks": 3.0}


def rounding_floor(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """The floor term of the rule (module docstring) for the finite values of ref, rounded in `dtype`."""
    finite = ref[torch.isfinite(ref)]
    if finite.numel() == 0:
        return 0.0
    noise = 2 * ((finite.to(dtype) + 0.3 - 0.3).double() - finite).abs().max().item()
    return max(noise, torch.finfo(dtype).eps * finite.abs().max().item())


def delta_noise(q, k, out, do, probs, scale, bias_shape=None, lse=None, sinks=None) -> dict:
    """fp32 rounding noise of delta carried into dq and dk, into the gradient of a bias of bias_shape, and into the
    sinks' (given the lse, which includes them) (see the module docstring); (B, H, S, D) views."""
    c = (do.abs() * out.abs()).sum(-1, keepdim=True)  # (B, Hq, Sq, 1)
    B, Hkv, Sk, D = k.shape
    group = q.shape[1] // Hkv
    dq = c * (probs @ k.abs().repeat_interleave(group, dim=1))
    dk = ((probs * c).transpose(-1, -2) @ q.abs()).reshape(B, Hkv, group, Sk, D).sum(2)
    eps = 2 * torch.finfo(torch.float32).eps
    return {"dq": eps * scale * dq.max().item(), "dk": eps * scale * dk.max().item(),
            "dbias": eps * (probs * c).sum_to_size(bias_shape or probs.shape).max().item(),
            "dsinks": 0.0 if sinks is None else eps * (
                torch.exp(sinks.double().view(1, -1, 1) - lse.double()) * c[..., 0]).sum((0, 2)).max().item()}


FP8_ROUNDING = {torch.float8_e4m3fn: (3, -6), torch.float8_e5m2: (2, -14)}  # (stored mantissa bits, emin)


def fp8_p_floor(probs: torch.Tensor, v: torch.Tensor, fp8_dtype: torch.dtype) -> float:
    """The floor of FP8 P rounding (module docstring): probs (..., Sq, Sk) of the reference, v (..., Sk, Dv) the
    dequantized values (query heads' views)."""
    mant, emin = FP8_ROUNDING[fp8_dtype]
    p = probs.double()
    step = p.amax(-1, keepdim=True) * 2.0 ** (emin - mant - 1)
    return (torch.maximum(p * 2.0 ** -(mant + 1), step) @ v.double().abs()).max().item() if p.numel() else 0.0


def lse_noise(probs: torch.Tensor, lse: torch.Tensor) -> float:
    """The floor term of weights rebuilt from a float32 lse (module docstring): probs (..., Sq, Sk), lse (..., Sq)."""
    lse = torch.where(torch.isfinite(lse), lse, 0.0).abs().to(probs.dtype)
    return 2 * torch.finfo(torch.float32).eps * (probs * lse[..., None]).max().item()


def _max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| over finite ref entries; inf if x is non-finite there or the infinities differ."""
    x, ref = x.double(), ref.double()
    fin = torch.isfinite(ref)
    if not torch.equal(torch.isinf(x) & (x < 0), torch.isinf(ref) & (ref < 0)) or not torch.isfinite(x[fin]).all():
        return float("inf")
    return (x[fin] - ref[fin]).abs().max().item() if fin.any() else 0.0


@dataclass
class Metric:
    err: float  # max |fused - ref64|
    pt_err: float  # max |pytorch same dtype - ref64|
    floor: float
    factor: float

    @classmethod
    def measure(cls, got, ref, pt, dtype, factor, extra_floor=0.0):
        """got and pt (PyTorch in the input dtype) against ref (float64)."""
        return cls(_max_err(got, ref), _max_err(pt, ref), rounding_floor(ref, dtype) + extra_floor, factor)

    @property
    def budget(self) -> float:
        return self.factor * self.pt_err + self.floor

    @property
    def ok(self) -> bool:
        return self.err <= self.budget

    @property
    def ratio(self) -> float:  # error relative to PyTorch's own same-dtype error
        return self.err / self.pt_err if self.pt_err > 0 else (0.0 if self.err == 0 else float("inf"))
