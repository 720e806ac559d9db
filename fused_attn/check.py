"""`python -m fused_attn check`: a numerics report of the Triton kernels on this machine (GPU compiled, or CPU
through the Triton interpreter) against the float64 reference, with FlashAttention's tolerance rule."""
import json
import platform

import torch
import triton

from . import __version__, kernels
from .progress import Progress
from .testing import Case, evaluate

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
MASKS = [(False, (-1, -1)), (True, (-1, -1)), (False, (16, 16)), (True, (32, -1))]


def sweep(full: bool, gpu: bool):
    """The cases: small odd shapes through the interpreter, long sequences on a GPU."""
    if gpu:
        shapes = [(2, 8, 8, 1024, 1024, 64, 64), (2, 16, 2, 2047, 2048, 128, 128), (1, 8, 8, 1000, 3000, 256, 256)]
        shapes += [(1, 8, 1, 4096, 4096, 128, 128), (4, 12, 4, 513, 257, 80, 80)] if full else []
        dtypes = [BF16, F16] + ([F32] if full else [])
    else:
        shapes = [(1, 4, 2, 113, 203, 64, 64), (1, 2, 2, 127, 77, 40, 40)]
        shapes += [(1, 3, 1, 97, 97, 128, 64), (1, 2, 2, 64, 64, 256, 256), (2, 2, 1, 1, 130, 96, 96)] if full else []
        dtypes = [F16, F32] + ([BF16] if full else [])
    masks = MASKS if full else MASKS[:3]
    cases = [Case(*s, dtype=d, causal=c, window=w) for s in shapes for d in dtypes for c, w in masks]
    if full:
        cases.append(Case(*shapes[0], dtype=dtypes[0], causal=True, layout="bshd", strided=True))
        cases.append(Case(*shapes[0], dtype=dtypes[0], logit_scale=20.0))
    return cases


def _on_gpu() -> bool:
    return torch.cuda.is_available() and not kernels.interpreter_active()


def environment() -> dict:
    gpu = _on_gpu()
    return {
        "device": torch.cuda.get_device_name() if gpu else f"CPU ({platform.processor() or platform.machine()}), "
                                                           "Triton interpreter",
        "torch": torch.__version__, "triton": triton.__version__, "fused_attn": __version__,
    }


def _fmt(m) -> str:
    return f"{m.err:7.1e} x{m.ratio:5.2f}{' ' if m.ok else '!'}"


def run(full=False, save_baseline=None, baseline=None) -> int:
    gpu = _on_gpu()
    if not gpu and not kernels.interpreter_active():
        print("No CUDA GPU and TRITON_INTERPRET is not set: nothing to run the kernels on.")
        return 2
    device = "cuda" if gpu else "cpu"
    env = environment()
    print(f"fused_attn {env['fused_attn']} numerics check on {env['device']} (torch {env['torch']}, "
          f"triton {env['triton']})")
    print("max |err| vs the float64 reference, and x the ratio to PyTorch's own same-dtype error; "
          "PASS: err <= 2x (out, lse) / 3x (grads) PyTorch's error + rounding floor")
    base = json.load(open(baseline))["cases"] if baseline else {}
    names = ("out", "lse", "dq", "dk", "dv")
    cases = sweep(full, gpu)
    width = max(len(c.name) for c in cases)
    print(f"{'case':<{width}}  " + "  ".join(f"{n:<15}" for n in names) + "  result")
    results, failures = {}, 0
    progress = Progress(len(cases), "check")
    for case in cases:
        progress.current(case.name)
        res = evaluate(case, device)
        status = "PASS" if res.ok else "FAIL"
        grown = [n for n, m in res.metrics.items()
                 if case.name in base and m.err > 2 * max(base[case.name].get(n, 0.0), m.floor)]
        if grown:
            status = "FAIL (grew >2x vs baseline: " + ", ".join(grown) + ")"
        failures += status != "PASS"
        progress.advance(f"{case.name:<{width}}  " + "  ".join(_fmt(res.metrics[n]) for n in names) + f"  {status}")
        results[case.name] = {n: m.err for n, m in res.metrics.items()}
    progress.close()
    missing = sorted(set(base) - set(results))
    if missing:
        print(f"note: {len(missing)} baseline case(s) not in this sweep: {', '.join(missing[:5])}")
    if save_baseline:
        with open(save_baseline, "w") as f:
            json.dump({"environment": env, "cases": results}, f, indent=1)
        print(f"baseline written to {save_baseline}")
    print(f"{len(results) - failures}/{len(results)} cases passed")
    return 1 if failures else 0


