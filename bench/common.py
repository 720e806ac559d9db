"""What the benchmarks (the sweep, --varlen, --decode, --flex, --serving) share: the environment recorded beside
every row, the result files, the provider check against the float64 reference, the timers, the K/V bandwidth,
and the one sweep loop."""
import csv
import json
import subprocess
from pathlib import Path

import torch

from fused_attn.numerics import FACTORS, Metric
from fused_attn.progress import Progress

FIELDS = ["gpu", "torch", "triton", "commit", "provider", "mode", "dtype", "seqlen", "head_dim", "mask", "window",
          "modifier", "batch", "heads_q", "heads_kv", "status", "ms", "tflops", "peak_mem_mb", "kv_gb_per_s",
          "bandwidth_fraction", "mask_build_ms", "check_err", "check_budget"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Unsupported(Exception):
    """A provider cannot run a case; the reason is reported in the results, never dropped silently."""


def probe(fn):
    """fn, after one call: a RuntimeError ("No available kernel" and friends) means the backend cannot take the
    case, reported as Unsupported."""
    try:
        fn()
    except RuntimeError as e:
        raise Unsupported(str(e).splitlines()[0][:200]) from None
    return fn


def environment() -> dict:
    """GPU name, torch / triton versions and the git commit (with -dirty for uncommitted changes)."""
    import triton
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent, timeout=10).stdout.strip()
        commit = (commit + "-dirty" if dirty else commit) or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "commit": commit}


def write(rows, env, out: Path):
    """results.json (every field) and results.csv (FIELDS) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.json", "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (" ".join(map(str, r[k])) if isinstance(r.get(k), list) else r.get(k)) for k in FIELDS})


def check(cache: dict, key, run, reference):
    """(status, Metric or None) of one provider on a small case, cached under `key`: run() gives its output (or
    raises Unsupported), reference(upcast) the reference's (float64, and None: the inputs' dtype), measured with
    FlashAttention's forward rule."""
    if key not in cache:
        try:
            out = run()
        except Unsupported as e:
            cache[key] = ("unsupported: " + str(e), None)
            return cache[key]
        ref, pt = reference(torch.float64), reference(None)
        m = Metric.measure(out, ref, pt, pt.dtype, FACTORS["out"])
        cache[key] = ("ok" if m.ok else "failed check", m)
    return cache[key]


def measure(make, case, inputs, wrap=lambda fn: fn):
    """(status, ms, peak extra MiB) of the provider make(case, q, k, v, ...) on `inputs` in case.mode (time_call;
    an Unsupported provider is reported, not timed). wrap: what each timed call runs under (a kernel path)."""
    try:
        fwd = make(case, *inputs)
    except Unsupported as e:
        return "unsupported: " + str(e), None, None
    q, k, v = inputs[:3]
    return time_call(wrap(fwd), case.mode, torch.randn_like(q), [q, k, v], wrap)


def time_step(make):
    """(status, ms, None) of an inference call: fn = make() (a provider built on a case's inputs; Unsupported is
    reported, not timed), triton's do_bench median. The decode and serving benchmarks time this way."""
    import triton
    try:
        return "ok", triton.testing.do_bench(make(), warmup=25, rep=100, return_mode="median"), None
    except Unsupported as e:
        return "unsupported: " + str(e), None, None
    except torch.cuda.OutOfMemoryError:
        return "oom", None, None
    finally:
        torch.cuda.empty_cache()


def peak_bandwidth(device) -> float:
    """Bytes per second of the GPU's memory (2 transfers per clock), or None where torch does not say."""
    props = torch.cuda.get_device_properties(device)
    clock, width = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    return 2 * clock * 1e3 * width / 8 if clock and width else None


def bandwidth(kv_bytes: int, ms: float) -> dict:
    """K/V bytes read per second, and as a fraction of the GPU's memory bandwidth."""
    gbs = kv_bytes / (ms * 1e-3) / 1e9
    peak = peak_bandwidth("cuda")
    return {"kv_gb_per_s": gbs, "bandwidth_fraction": gbs * 1e9 / peak if peak else None}


def time_call(fwd, mode, do, inputs, wrap=lambda fn: fn):
    """(status, ms, peak extra MiB) of fwd (mode "fwd"), the backward of one fwd output ("bwd") or both
    ("fwd+bwd"): a warm-up (compiles), one run for the peak memory, then triton's do_bench median."""
    import triton
    if mode == "fwd":
        fn = fwd
    elif mode == "bwd":
        out = fwd()
        fn = lambda: out.backward(do, retain_graph=True)  # noqa: E731
    else:
        fn = lambda: fwd().backward(do)  # noqa: E731
    fn = wrap(fn)
    try:
        fn()  # warm-up / compile
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        ms = triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=inputs, return_mode="median")
    except torch.cuda.OutOfMemoryError:
        return "oom", None, None
    finally:
        torch.cuda.empty_cache()
    return "ok", ms, peak


def sweep(bench, cases, providers, env, out: Path, title: str):
    """The loop of every benchmark: each case x provider is checked (bench.check), timed where the check passed
    (bench.measure -> (status, ms, peak MiB); an exception becomes the row's status "error: ..."), turned into a
    row with bench.derived(case, name, ms) (TF/s, GB/s, ...) and shown with its label (bench.label(case)); the rows
    are written after every case (a crash keeps what was measured). Progress: current case, done / total, elapsed
    and remaining time."""
    print(f"{env['gpu']}  torch {env['torch']}  triton {env['triton']}  commit {env['commit']}  {title}", flush=True)
    rows, checks = [], {}
    progress = Progress(len(cases) * len(providers), title)
    for case in cases:
        for name in providers:
            progress.current(f"{bench.label(case)} {name}")
            ms = peak = metric = None
            try:
                status, metric = bench.check(name, case, "cuda", checks)
                if status == "ok":
                    status, ms, peak = bench.measure(name, case, "cuda")
            except Exception as e:  # one provider's failure is a row, not the end of a scarce GPU run
                first = str(e).splitlines()[0][:200] if str(e) else ""
                status, ms = f"error: {type(e).__name__}: {first}", None
            derived = bench.derived(case, name, ms) if ms else {}
            rows.append(dict(env, provider=name, **case.as_dict(), status=status, ms=ms, peak_mem_mb=peak, **derived,
                             check_err=metric.err if metric else None,
                             check_budget=metric.budget if metric else None))
            shown = (f"{ms:9.3f} ms " + " ".join(f"{v:8.1f} {k}" for k, v in derived.items() if v is not None)
                     if ms else status)
            progress.advance(f"{bench.label(case)} {name:24} {shown}")
        write(rows, env, out)
    progress.close()
    return rows
