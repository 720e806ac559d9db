"""`python -m bench.tune`: time fused_attn's kernels over candidate configs on a GPU -- tiles, warps, stages, the
load path (pointer or TMA), the tile order (natural or longest-first) and the schedule (persistent programs, a
warp-specialized kernels) -- and print the fastest per (head dim, mask, kernel), to be copied into
fused_attn/kernels/configs.py. Each candidate is checked against the default config's output before it is timed; the
backward's two kernels are tuned one at a time, the other keeping its default config.

    python -m bench.tune --head-dims 64 128 --masks causal --seqlen 16384 [--paths ptr tma persistent ws] [--dry-run]
"""
import argparse
import dataclasses
import itertools
import json
import sys

import torch

from fused_attn.kernels import attention_backward, attention_forward
from fused_attn.kernels.configs import KernelConfig, backward_config, split_dkdv, tma_capable

TILES_FWD = list(itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)))
TILES_BWD = list(itertools.product((16, 32, 64, 128), (32, 64, 128), (4, 8), (1, 2, 3)))
KINDS = ("fwd", "dkdv", "dq")


PATHS = ("ptr", "tma", "persistent", "ws")  # ws: the forward's warp-specialized loop (4 warps per consumer group)


def candidates(kind: str, head_dim: int, limit: int, paths=("ptr", "tma"), orders=("natural", "longest")):
    """Candidates for one kernel; big tiles are dropped for D = 256 (they cannot fit shared memory). Persistent
    kernels walk their tiles heaviest first, so they take no order of their own; warp specialization is the
    forward's, at 4 warps per consumer group."""
    tiles = TILES_FWD if kind == "fwd" else TILES_BWD
    ws_tiles = [t for t in tiles if t[0] == 128 and t[2] == 4 and (head_dim <= 128 or t[1] <= 64)]
    if head_dim > 128:
        tiles = [t for t in tiles if t[0] * t[1] <= 64 * 64]
    split = kind == "dkdv" and split_dkdv(head_dim, head_dim)  # as the default config does
    pool = []
    for path in paths:
        if path == "ws" and kind != "fwd":
            continue
        for order in ("natural",) if path == "persistent" else orders:
            pool += [KernelConfig(*t, tma=path in ("tma", "persistent"), longest_first=order == "longest",
                                  split_dkdv=split, persistent=path == "persistent", warp_specialize=path == "ws")
                     for t in (ws_tiles if path == "ws" else tiles)]
    return pool[:limit] if limit else pool


def _time(fn):
    import triton
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def tune_case(d, mask, seqlen, tokens, hidden, dtype, limit, paths, orders, out=print):
    B, H = max(1, tokens // seqlen), hidden // d
    q, k, v, do = (torch.randn(B, H, seqlen, d, device="cuda", dtype=dtype) for _ in range(4))
    left, right = {"none": (-1, -1), "causal": (-1, 0)}.get(mask) or (int(mask[len("window"):]) - 1, 0)
    args = (d ** -0.5, 0, left, right)
    buf = lambda: (torch.empty_like(q), torch.empty(B, H, seqlen, device="cuda"),  # noqa: E731
                   torch.empty(B, H, seqlen, 2, device="cuda"))
    o0, lse0, st0 = buf()
    attention_forward(q, k, v, o0, lse0, st0, *args)
    g0 = [torch.empty_like(t) for t in (q, k, v)]
    attention_backward(do, q, k, v, o0, st0, *g0, torch.empty_like(lse0), *args)
    defaults = backward_config(d, d, dtype, torch.cuda.get_device_capability())
    best = {}
    for kind in KINDS:
        results = []
        for cfg in candidates(kind, d, limit, paths, orders):
            try:
                if kind == "fwd":
                    o, lse, st = buf()
                    fn = lambda o=o, lse=lse, st=st, cfg=cfg: attention_forward(q, k, v, o, lse, st, *args,  # noqa
                                                                       config=cfg)
                    fn()
                    ok = torch.allclose(o, o0, atol=2e-2, rtol=2e-2)
                else:
                    g = [torch.empty_like(t) for t in (q, k, v)]
                    delta = torch.empty_like(lse0)
                    pair = (cfg, defaults[1]) if kind == "dkdv" else (defaults[0], cfg)
                    fn = lambda g=g, delta=delta, pair=pair: attention_backward(do, q, k, v, o0, st0, *g, delta,  # noqa
                                                                                *args, config=pair)
                    fn()
                    ok = all(torch.allclose(a, b, atol=5e-2, rtol=2e-2) for a, b in zip(g, g0))
                if not ok:
                    out(f"  {kind} {cfg}: output differs from the default config's -- skipped")
                    continue
                results.append((_time(fn), cfg))
            except Exception as e:  # out of shared memory / registers for this tile: not a candidate
                out(f"  {kind} {cfg}: {type(e).__name__}")
        results.sort(key=lambda r: r[0])
        for ms, cfg in results[:3]:
            out(f"D={d} {mask:10} {kind}: {ms:8.3f} ms  {cfg}")
        if results:
            best[kind] = {"ms": results[0][0], **dataclasses.asdict(results[0][1])}
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tune", description=__doc__.split("\n")[0])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--masks", nargs="+", default=["none", "causal"])
    p.add_argument("--seqlen", type=int, default=16384)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--limit", type=int, default=0, help="at most this many candidates per kernel (0: all)")
    p.add_argument("--paths", nargs="+", default=["ptr", "tma"], choices=PATHS,
                   help="load paths and schedules to try (all but ptr: compute capability 9.0+)")
    p.add_argument("--orders", nargs="+", default=["natural", "longest"], choices=["natural", "longest"],
                   help="tile orders to try")
    p.add_argument("--out", help="write the best configs as JSON")
    p.add_argument("--dry-run", action="store_true", help="list the candidates and exit")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.dry_run:
        for d in args.head_dims:
            for kind in KINDS:
                print(f"D={d} {kind}: {len(candidates(kind, d, args.limit, args.paths, args.orders))} candidates")
        return 0
    if not torch.cuda.is_available():
        print("python -m bench.tune needs an NVIDIA GPU (CUDA); none is visible here (try --dry-run).")
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    paths = [p for p in args.paths if p == "ptr" or tma_capable(torch.cuda.get_device_capability())]
    best = {f"d{d}-{m}": tune_case(d, m, args.seqlen, args.tokens, args.hidden, dtype, args.limit, paths, args.orders)
            for d in args.head_dims for m in args.masks}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "best": best}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
