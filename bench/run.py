"""`python -m bench`: time fused_attn beside its peers over the sweep (or the packed-batch / decode benchmarks);
write JSON + CSV rows and PNG plots."""
import argparse
import json
import sys
from pathlib import Path

import torch

import fused_attn

from . import common, decode, flex, host, plot, serving, sweep, varlen
from .common import DTYPES
from .providers import PROVIDERS, scoped

# The sweep's own options; --varlen and --decode take the ones listed for them and refuse the others.
SWEEP_OPTIONS = ("seqlens", "head_dims", "masks", "modes", "modifiers", "gqa_ratio", "gqa_only", "tokens", "hidden")
TAKES = {"varlen": ("head_dims", "masks", "modes", "hidden"), "decode": ("seqlens", "head_dims"),
         "flex": ("seqlens", "head_dims", "masks", "modes", "hidden"), "serving": ("seqlens", "head_dims")}
DEFAULTS = dict(seqlens=list(sweep.SEQLENS), head_dims=list(sweep.HEAD_DIMS), masks=list(sweep.MASKS),
                modes=list(sweep.MODES), modifiers=list(sweep.MODIFIERS), gqa_ratio=8, gqa_only=False, tokens=16384,
                hidden=2048)


# Providers run only when named (--providers): the batch-invariant mode's cost is its own comparison.
OPT_IN = ("fused_attn-invariant", "fused_attn-kvcache-invariant")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--seqlens", type=int, nargs="+", help=f"sequence lengths (default {list(sweep.SEQLENS)}); "
                   f"with --decode: the cache lengths (default {list(decode.CACHES)})")
    p.add_argument("--head-dims", type=int, nargs="+", help=f"default {list(sweep.HEAD_DIMS)}; --decode: 128")
    p.add_argument("--masks", nargs="+", help="none, causal, window<W> (causal sliding window of W keys); "
                   "--varlen: none, causal")
    p.add_argument("--modes", nargs="+", choices=sweep.MODES)
    p.add_argument("--providers", nargs="+",
                   choices=sorted(set().union(PROVIDERS, varlen.PROVIDERS, decode.PROVIDERS, flex.PROVIDERS,
                                              serving.PROVIDERS)),
                   help="default: every provider of the benchmark but the batch-invariant mode's (opt-in)")
    p.add_argument("--varlen", action="store_true",
                   help="the packed-batch case instead of the sweep: 16k tokens in sequences of mixed lengths "
                        "(bench/varlen.py); takes --head-dims, --masks none/causal, --modes, --hidden, --dtype")
    p.add_argument("--decode", action="store_true",
                   help="the decode sweep instead (bench/decode.py): Sq 1 / 4 against 1k..128k cached tokens, "
                        "contiguous and paged caches; reports us, GB/s of K/V read and the bandwidth fraction; "
                        "takes --seqlens (cache lengths), --head-dims, --dtype")
    p.add_argument("--flex", action="store_true",
                   help="masks of any shape instead (bench/flex.py): flex_attention with block masks beside "
                        "FlexAttention and the built-in masks; --masks documents prefix_lm sliding<W> causal; takes "
                        "--seqlens (one), --head-dims, --modes, --hidden, --dtype")
    p.add_argument("--serving", action="store_true",
                   help="the serving step instead (bench/serving.py): a 2,048-query prefill chunk + 63 decodes, or "
                        "64 decodes, over a paged cache (4k..32k keys per sequence, pages 16 / 256, bf16 / FP8); "
                        "reports GB/s of K/V read and the bandwidth fraction; takes --seqlens (cache lengths), "
                        "--head-dims, --dtype")
    p.add_argument("--host", action="store_true",
                   help="host time per call of every entry point instead (bench/host.py), as ratios to a tiny torch "
                        "SDPA call timed in the same run; on the CPU with the kernels' launches stubbed (set "
                        "TRITON_INTERPRET=1); takes --calls")
    p.add_argument("--calls", type=int, default=300, help="--host: timed calls per entry (default 300)")
    p.add_argument("--modifiers", nargs="*", choices=sweep.MODIFIERS,
                   help="extra rows with softcap / ALiBi / dropout 0.1 (causal, D=128, S 4096 and 16384, where the "
                        "sweep has them; default all three); give none of them to leave them out")
    p.add_argument("--gqa-ratio", type=int, help="also run Hkv = Hq / ratio (default 8; 1: MHA only)")
    p.add_argument("--gqa-only", action="store_true", default=None, help="only the GQA configurations")
    p.add_argument("--tokens", type=int, help="batch * seqlen (default 16384)")
    p.add_argument("--hidden", type=int, help="heads * head_dim (default 2048)")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--out", default="bench/results", help="folder for results.json, results.csv and plots")
    p.add_argument("--dry-run", action="store_true", help="list the sweep and exit")
    p.add_argument("--plot-only", metavar="RESULTS_JSON", help="redraw the plots from a results file")
    args = p.parse_args(argv)
    if args.varlen + args.decode + args.flex + args.serving + args.host > 1:
        p.error("--varlen, --decode, --flex, --serving and --host are separate benchmarks: pick one")
    if args.host:
        refused = [o for o in SWEEP_OPTIONS + ("providers",) if getattr(args, o) is not None]
        if refused:
            p.error("--host does not take " + ", ".join("--" + o.replace("_", "-") for o in refused))
        return args
    kind = next((k for k in ("varlen", "decode", "flex", "serving") if getattr(args, k)), None)
    if kind:
        refused = [o for o in SWEEP_OPTIONS if getattr(args, o) is not None and o not in TAKES[kind]]
        if refused:
            p.error(f"--{kind} does not take " + ", ".join("--" + o.replace("_", "-") for o in refused))
    for option, value in DEFAULTS.items():  # --varlen / --decode: None where not given, their own defaults
        if getattr(args, option) is None and not kind:
            setattr(args, option, value)
    for m in args.masks or ():
        if kind == "flex":
            if m not in flex.MASKS and not (m.startswith("sliding") and m[len("sliding"):].isdigit()):
                p.error(f"--flex masks are documents, prefix_lm, sliding<W>, causal; got {m!r}")
            continue
        if m not in ("none", "causal") and not (m.startswith("window") and m[len("window"):].isdigit()):
            p.error(f"unknown mask {m!r}: use none, causal or window<W>")
        if kind == "varlen" and m not in ("none", "causal"):
            p.error(f"--varlen takes the masks none and causal, got {m!r}")
    if args.dtype == "fp32" and not kind == "decode":
        p.error("--dtype fp32 is for --decode only (the sweeps time the tensor-core dtypes bf16 / fp16)")
    return args


def _inputs(cfg, device, requires_grad):
    dtype = DTYPES[cfg.dtype]
    g = torch.Generator(device=device).manual_seed(0)
    shape = lambda h: (cfg.batch, h, cfg.seqlen, cfg.head_dim)  # noqa: E731
    q, k, v = (torch.randn(shape(h), device=device, dtype=dtype, generator=g).requires_grad_(requires_grad)
               for h in (cfg.heads_q, cfg.heads_kv, cfg.heads_kv))
    return q, k, v


def check_provider(name, cfg, device, cache):
    """The provider once on a small case of the same kind against the float64 reference (common.check). Cached per
    (provider, head dim, mask, gqa, modifier). Dropout is random: its check is the same call with dropout_p = 0
    once the provider has shown it takes dropout at all (tests/test_modifiers.py checks the masks)."""
    small = sweep.Config(min(cfg.seqlen, 512), cfg.head_dim, cfg.mask, "fwd", 1,
                         max(2, cfg.heads_q // 4), max(1, cfg.heads_kv // 4) if cfg.gqa else max(2, cfg.heads_q // 4),
                         cfg.dtype, "none" if cfg.modifier == "dropout" else cfg.modifier)
    q, k, v = _inputs(small, device, False)

    def run():
        if cfg.modifier == "dropout":
            PROVIDERS[name](cfg, *_inputs(small, device, False))
        return scoped(name, PROVIDERS[name](small, q, k, v))()

    kw = dict(causal=small.causal, window_size=small.window, **small.modifier_kwargs(device))
    return common.check(cache, (name, cfg.head_dim, cfg.mask, cfg.gqa, cfg.modifier), run,
                        lambda upcast: fused_attn.reference.attention(q, k, v, upcast=upcast, **kw))


check = check_provider  # the name every benchmark module gives its check (common.sweep)


def measure(name, cfg, device):
    """(status, ms, peak extra MiB) for one provider on one config."""
    return common.measure(PROVIDERS[name], cfg, _inputs(cfg, device, cfg.mode != "fwd"), lambda fn: scoped(name, fn))


def label(cfg) -> str:
    return (f"S={cfg.seqlen:6} D={cfg.head_dim:3} Hq/Hkv={cfg.heads_q}/{cfg.heads_kv} {cfg.mask:11} {cfg.modifier:8} "
            f"{cfg.mode:8}")


def derived(cfg, name, ms) -> dict:
    return {"tflops": cfg.flops() / (ms * 1e-3) / 1e12}


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    if args.plot_only:
        with open(args.plot_only) as f:
            data = json.load(f)
        for path in plot.plot_all(data["rows"], out / "plots"):
            print("wrote", path)
        return 0
    if args.host:
        return host_main(args, out / "host")
    bench, title = sys.modules[__name__], "sweep"
    if args.varlen:
        bench, title, out = varlen, "varlen", out / "varlen"
    elif args.decode:
        bench, title, out = decode, "decode", out / "decode"
    elif args.flex:
        bench, title, out = flex, "flex", out / "flex"
    elif args.serving:
        bench, title, out = serving, "serving", out / "serving"
    providers = args.providers or [p for p in bench.PROVIDERS if p not in OPT_IN]
    unknown = [p for p in providers if p not in bench.PROVIDERS]
    if unknown:
        raise SystemExit(f"{title} providers are {', '.join(bench.PROVIDERS)}; got {', '.join(unknown)}")
    cases = bench.build_from(args)
    if args.dry_run:
        for c in cases:
            print(bench.describe(c) + f"  x {len(providers)} providers")
        print(f"{title}: {len(cases)} configurations x {len(providers)} providers: {', '.join(providers)}")
        return 0
    if not torch.cuda.is_available():
        print(f"python -m bench ({title}) needs an NVIDIA GPU (CUDA); none is visible here. Use --dry-run to list "
              "the cases, or --plot-only to redraw plots from saved results.")
        return 2
    rows = common.sweep(bench, cases, providers, common.environment(), out, title)
    if bench is not sys.modules[__name__]:
        return 0
    for path in plot.plot_all(rows, out / "plots"):
        print("wrote", path)
    return 0


def host_main(args, out: Path) -> int:
    """--host: the table on stdout, the rows in out/results.json with the environment."""
    if not torch.cuda.is_available() and not fused_attn.kernels.interpreter_active():
        print("python -m bench --host without a GPU times the CPU path with the launches stubbed: set "
              "TRITON_INTERPRET=1 (CPU tensors run only under the Triton interpreter)")
        return 2
    rows = host.measure(calls=args.calls)
    print(host.table(rows))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.json", "w") as f:
        json.dump({"environment": common.environment(), "rows": rows}, f, indent=1)
    print("wrote", out / "results.json")
    return 0


def build_from(args):
    return sweep.build(args.seqlens, args.head_dims, args.masks, args.modes, args.gqa_ratio, args.tokens,
                       args.hidden, args.dtype, args.gqa_only, args.modifiers)


def describe(c) -> str:
    return (f"S={c.seqlen:6} D={c.head_dim:3} B={c.batch:3} Hq={c.heads_q:3} Hkv={c.heads_kv:3} {c.mask:11} "
            f"{c.modifier:8} {c.mode:8} {c.flops() / 1e12:9.3f} TFLOP")
