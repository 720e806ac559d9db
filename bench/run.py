"""`python -m bench`: time fused_attn beside its peers over the sweep; write JSON + CSV rows and PNG plots."""
import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import torch

import fused_attn
from fused_attn.numerics import FACTORS, Metric

from . import decode, plot, sweep, varlen
from .providers import PROVIDERS, Unsupported, scoped

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FIELDS = ["gpu", "torch", "triton", "commit", "provider", "mode", "dtype", "seqlen", "head_dim", "mask", "window",
          "modifier", "batch", "heads_q", "heads_kv", "status", "ms", "tflops", "peak_mem_mb", "check_err", "check_budget"]


def environment() -> dict:
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


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--seqlens", type=int, nargs="+", default=list(sweep.SEQLENS))
    p.add_argument("--head-dims", type=int, nargs="+", default=list(sweep.HEAD_DIMS))
    p.add_argument("--masks", nargs="+", default=list(sweep.MASKS),
                   help="none, causal, window<W> (causal sliding window of W keys)")
    p.add_argument("--modes", nargs="+", default=list(sweep.MODES), choices=sweep.MODES)
    p.add_argument("--providers", nargs="+",
                   choices=sorted(set(PROVIDERS) | set(varlen.PROVIDERS) | set(decode.PROVIDERS)),
                   help="default: every provider of the sweep (or of --varlen)")
    p.add_argument("--varlen", action="store_true",
                   help="the packed-batch case instead of the sweep: 16k tokens in sequences of mixed lengths "
                        "(bench/varlen.py); takes --head-dims, --masks none/causal, --modes, --hidden, --dtype")
    p.add_argument("--decode", action="store_true",
                   help="the decode sweep instead (bench/decode.py): Sq 1 / 4 against 1k..128k cached tokens, "
                        "contiguous and paged caches; reports us, GB/s of K/V read and the bandwidth fraction")
    p.add_argument("--modifiers", nargs="*", default=list(sweep.MODIFIERS), choices=sweep.MODIFIERS,
                   help="extra rows with softcap / ALiBi / dropout 0.1 (causal, D=128, S 4096 and 16384, where the "
                        "sweep has them); give none of them to leave them out")
    p.add_argument("--gqa-ratio", type=int, default=8, help="also run Hkv = Hq / ratio (1: MHA only)")
    p.add_argument("--gqa-only", action="store_true", help="only the GQA configurations")
    p.add_argument("--tokens", type=int, default=16384, help="batch * seqlen")
    p.add_argument("--hidden", type=int, default=2048, help="heads * head_dim")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--out", default="bench/results", help="folder for results.json, results.csv and plots")
    p.add_argument("--dry-run", action="store_true", help="list the sweep and exit")
    p.add_argument("--plot-only", metavar="RESULTS_JSON", help="redraw the plots from a results file")
    args = p.parse_args(argv)
    for m in args.masks:
        if m not in ("none", "causal") and not (m.startswith("window") and m[len("window"):].isdigit()):
            p.error(f"unknown mask {m!r}: use none, causal or window<W>")
    return args


def _inputs(cfg, device, requires_grad):
    dtype = DTYPES[cfg.dtype]
    g = torch.Generator(device=device).manual_seed(0)
    shape = lambda h: (cfg.batch, h, cfg.seqlen, cfg.head_dim)  # noqa: E731
    q, k, v = (torch.randn(shape(h), device=device, dtype=dtype, generator=g).requires_grad_(requires_grad)
               for h in (cfg.heads_q, cfg.heads_kv, cfg.heads_kv))
    return q, k, v


def check_provider(name, cfg, device, cache):
    """Run the provider once on a small case of the same kind and measure it against the float64 reference with
    FlashAttention's forward rule (fused_attn.numerics). Cached per (provider, head dim, mask, gqa, modifier).
    Dropout is random: its check is the same call with dropout_p = 0 (tests/test_modifiers.py checks the masks)."""
    key = (name, cfg.head_dim, cfg.mask, cfg.gqa, cfg.modifier)
    if key not in cache:
        small = sweep.Config(min(cfg.seqlen, 512), cfg.head_dim, cfg.mask, "fwd", 1,
                             max(2, cfg.heads_q // 4), max(1, cfg.heads_kv // 4) if cfg.gqa else max(2, cfg.heads_q // 4),
                             cfg.dtype, "none" if cfg.modifier == "dropout" else cfg.modifier)
        if cfg.modifier == "dropout":  # the provider must take dropout at all
            try:
                PROVIDERS[name](cfg, *_inputs(small, device, False))
            except Unsupported as e:
                cache[key] = ("unsupported: " + str(e), None)
                return cache[key]
        q, k, v = _inputs(small, device, False)
        try:
            out = scoped(name, PROVIDERS[name](small, q, k, v))()
        except Unsupported as e:
            cache[key] = ("unsupported: " + str(e), None)
            return cache[key]
        kw = dict(causal=small.causal, window_size=small.window, **small.modifier_kwargs(device))
        ref = fused_attn.reference.attention(q, k, v, upcast=torch.float64, **kw)
        pt = fused_attn.reference.attention(q, k, v, upcast=None, **kw)
        m = Metric.measure(out, ref, pt, q.dtype, FACTORS["out"])
        cache[key] = ("ok" if m.ok else "failed check", m)
    return cache[key]


def measure(name, cfg, device):
    """(status, ms, peak extra MiB) for one provider on one config."""
    q, k, v = _inputs(cfg, device, cfg.mode != "fwd")
    try:
        fwd = PROVIDERS[name](cfg, q, k, v)
    except Unsupported as e:
        return "unsupported: " + str(e), None, None
    do = torch.randn(cfg.batch, cfg.heads_q, cfg.seqlen, cfg.head_dim, device=device, dtype=q.dtype)
    return time_call(scoped(name, fwd), cfg.mode, do, [q, k, v], lambda fn: scoped(name, fn))


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


def write(rows, env, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.json", "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (" ".join(map(str, r[k])) if isinstance(r.get(k), list) else r.get(k)) for k in FIELDS})


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    if args.plot_only:
        data = json.load(open(args.plot_only))
        for path in plot.plot_all(data["rows"], out / "plots"):
            print("wrote", path)
        return 0
    if args.varlen:
        return varlen.main(args)
    if args.decode:
        return decode.main(args)
    args.providers = args.providers or list(PROVIDERS)
    configs = sweep.build(args.seqlens, args.head_dims, args.masks, args.modes, args.gqa_ratio, args.tokens,
                          args.hidden, args.dtype, args.gqa_only, args.modifiers)
    if args.dry_run:
        for c in configs:
            print(f"S={c.seqlen:6} D={c.head_dim:3} B={c.batch:3} Hq={c.heads_q:3} Hkv={c.heads_kv:3} "
                  f"{c.mask:11} {c.modifier:8} {c.mode:8} {c.flops() / 1e12:9.3f} TFLOP  x {len(args.providers)} "
                  f"providers")
        print(f"{len(configs)} configurations x {len(args.providers)} providers: {', '.join(args.providers)}")
        return 0
    if not torch.cuda.is_available():
        print("python -m bench needs an NVIDIA GPU (CUDA); none is visible here. "
              "Use --dry-run to list the sweep, or --plot-only to redraw plots from saved results.")
        return 2
    env = environment()
    print(f"{env['gpu']}  torch {env['torch']}  triton {env['triton']}  commit {env['commit']}", flush=True)
    rows, checks = [], {}
    for cfg in configs:
        for name in args.providers:
            status, metric = check_provider(name, cfg, "cuda", checks)
            ms = peak = None
            if status == "ok":
                status, ms, peak = measure(name, cfg, "cuda")
            tflops = cfg.flops() / (ms * 1e-3) / 1e12 if ms else None
            rows.append(dict(env, provider=name, **cfg.as_dict(), status=status, ms=ms, tflops=tflops,
                             peak_mem_mb=peak, check_err=metric.err if metric else None,
                             check_budget=metric.budget if metric else None))
            shown = f"{ms:8.3f} ms {tflops:6.1f} TF/s {peak:8.1f} MiB" if ms else status
            print(f"S={cfg.seqlen:6} D={cfg.head_dim:3} Hq/Hkv={cfg.heads_q}/{cfg.heads_kv} {cfg.mask:11} "
                  f"{cfg.modifier:8} {cfg.mode:8} {name:15} {shown}", flush=True)
        write(rows, env, out)  # after every config: a crash keeps what was measured
    for path in plot.plot_all(rows, out / "plots"):
        print("wrote", path)
    return 0
