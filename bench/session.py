"""`python -m bench.session --part 1|2 [--dry-run] [--out DIR]`: the first GPU run, as two prepared parts that each
fit one device call (a command of at most 10 minutes; each part's steps are budgeted to about 6).

Part 1: the environment, a compiled smoke of the suite (SMOKE: bf16, a few large shapes, every kernel path --
pointer, TMA, persistent, warp-specialized -- FP8, serving, determinism), and the headline benchmark rows (D = 128,
16k tokens, no mask / causal, forward and forward + backward) with every path variant beside the peers.
Part 2: `bench.tune` over the row part 1 measured slowest against the best peer (`--from` part 1's results.json),
a few candidates per kernel over every load path and schedule; the batch-invariant mode's cost beside the default
(prefill forward, decoding); then `python -m bench --host` (host time per call with real launches).

--dry-run (on the CPU): the steps with their budgets, and the kernels part 1's benchmark rows compile -- distinct
specializations, counted from the launchers on meta tensors for sm_90 as the compile-time gate does -- with a time
estimate at COMPILE_S seconds each. Every step runs under its budget (a step that runs out is stopped and the next
one starts), writes its output under --out, and ends with its exit status.
"""
import argparse
import json
import os
import subprocess
import sys
import time

from . import travel_cache

SMOKE = [  # (pytest arguments) -- GPU-only parameters (bf16, large shapes) are collected only on a GPU
    ["tests/test_attention.py", "-k", "test_shapes_and_masks and bf16 and (q1023 or q2048 or q777) and "
                                      "(full or causal or win16)"],
    ["tests/test_attention.py", "tests/test_varlen.py", "-k", "deterministic or every_element"],
    ["tests/test_paths.py"],
    ["tests/test_fp8.py"],
    ["tests/test_serving.py", "tests/test_host_path.py", "-k",
     "mixed or alone or cuda_graph or scheduler_metadata_made_once or compiled_equal or replays_its_first_call"],
    # the batch-invariant mode, bitwise across paths and batch compositions, compiled (bf16 and a long sequence)
    ["tests/test_batch_invariant.py", "-k", "not api"],
]
HEADLINE = dict(head_dims=[128], masks=["none", "causal"], modes=["fwd", "fwd+bwd"], seqlens=[16384])
VARIANTS = ["fused_attn", "fused_attn-tma", "fused_attn-persistent", "fused_attn-ws", "fused_attn-ws-persistent"]
PEERS = ["sdpa-flash", "sdpa-cudnn", "flex"]
COMPILE_S = 1.5  # seconds per kernel compile measured by the gate on this project's 2-core CPU machine
PART_BUDGET = 360  # seconds of steps per part: a device call also spends minutes starting the machine
TRAVELED = travel_cache.DIR  # a Triton cache built on the CPU machine for this one's, if carried


def part1_steps(out: str):
    """(name, budget in seconds, command) of part 1."""
    py = sys.executable
    steps = [("environment", 10, [py, "-c", "import torch, triton; print(torch.cuda.get_device_name(), 'torch', "
                                            "torch.__version__, 'triton', triton.__version__)"])]
    steps += [(f"smoke-{i}", 40 if i == len(SMOKE) - 1 else 32, [py, "-m", "pytest", "-q", "-x", "-p",
                                                                 "no:cacheprovider", *args])
              for i, args in enumerate(SMOKE)]
    # The headline rows' kernels compiled in parallel into the JIT's own cache first (the gate's launches for the
    # benchmark shapes: the same specializations), so the benchmark's serial first calls find them compiled --
    # found there already where a cache compiled on the CPU machine traveled with the call (bench/travel_cache.py).
    cache = travel_cache.triton_cache_dir()
    traveled = os.path.exists(os.path.join(TRAVELED, "manifest.json"))
    if traveled:  # then the warm-up finds its kernels (here: 58 in 3.7 s on one core)
        steps.append(("travel-cache", 10, [py, "-m", "bench.travel_cache", "install", "--src", TRAVELED, "--dest",
                                           cache]))
    workers = str(min(16, os.cpu_count() or 1))
    steps.append(("warm-cache", 20 if traveled else 30, [py, "tests/aot_compile.py", "--workers", workers,
                                                         "--cache-dir", cache, "--only", *travel_cache.ONLY]))
    h = HEADLINE
    steps.append(("headline", 120, [py, "-m", "bench", "--out", os.path.join(out, "bench"), "--gqa-ratio", "1",
                                    "--seqlens", *map(str, h["seqlens"]), "--head-dims", *map(str, h["head_dims"]),
                                    "--masks", *h["masks"], "--modes", *h["modes"], "--providers", *VARIANTS,
                                    *PEERS]))
    return steps


def slowest_rows(results_path: str, n: int = 2):
    """The n (D, mask) rows of part 1 where fused_attn's best variant trails the best peer most: (ratio, D, mask)."""
    with open(results_path) as f:
        rows = json.load(f)["rows"]
    best = {}
    for r in rows:
        if r.get("status") != "ok" or not r.get("ms"):
            continue
        key = (r["head_dim"], r["mask"], r["mode"])
        side = "ours" if r["provider"].startswith("fused_attn") else "peer"
        sides = best.setdefault(key, {})
        sides[side] = min(sides.get(side, float("inf")), r["ms"])
    ratios = sorted(((v["ours"] / v["peer"], d, mask) for (d, mask, _), v in best.items() if len(v) == 2),
                    reverse=True)
    seen, picked = set(), []
    for ratio, d, mask in ratios:
        if (d, mask) not in seen:
            seen.add((d, mask))
            picked.append((ratio, d, mask))
    return picked[:n]


def part2_steps(out: str, results_path: str):
    py = sys.executable
    rows = slowest_rows(results_path, 1) if results_path and os.path.exists(results_path) else [
        (None, 128, "causal")]
    steps = [(f"tune-d{d}-{mask}", 150, [py, "-m", "bench.tune", "--head-dims", str(d), "--masks", mask,
                                         "--limit", "12", "--paths", "tma", "persistent", "ws",
                                         "--out", os.path.join(out, f"tune_d{d}_{mask}.json")])
             for _, d, mask in rows]
    # The batch-invariant mode's cost beside the default: the prefill forward (D = 128, causal, 16k tokens) and
    # decoding (8k and 128k caches).
    steps += [("invariant-prefill", 40, [py, "-m", "bench", "--seqlens", "16384", "--head-dims", "128", "--masks",
                                         "causal", "--modes", "fwd", "--gqa-ratio", "1", "--providers", "fused_attn",
                                         "fused_attn-invariant", "--out", os.path.join(out, "invariant-prefill")]),
              ("invariant-decode", 70, [py, "-m", "bench", "--decode", "--seqlens", "8192", "131072", "--providers",
                                        "fused_attn-kvcache", "fused_attn-kvcache-invariant",
                                        "--out", os.path.join(out, "invariant-decode")])]
    # Host time per call with real launches (the kernels compiled by their first calls), beside a tiny SDPA call.
    return steps + [("host", 60, [py, "-m", "bench", "--host", "--calls", "100", "--out", os.path.join(out, "bench")])]


def benchmark_kernels(arch: int = 90) -> int:
    """Distinct kernel specializations part 1's fused_attn rows compile for `arch` (launchers on meta tensors)."""
    import torch
    from fused_attn.kernels import backward, configs, forward
    from bench.providers import VARIANTS as USE
    seen = set()
    h, tokens, hidden = HEADLINE, 16384, 2048
    for d in h["head_dims"]:
        for S in h["seqlens"]:
            B, H = max(1, tokens // S), hidden // d
            q, k, v, o, do, dq, dk, dv = (torch.empty(B, S, H, d, dtype=torch.bfloat16, device="meta").transpose(1, 2)
                                          for _ in range(8))
            lse, delta = (torch.empty(B, H, S, device="meta") for _ in range(2))
            stats = torch.empty(B, H, S, 2, device="meta")
            for mask in h["masks"]:
                window = (-1, -1) if mask == "none" else (-1, 0)
                for variant in VARIANTS:
                    with configs.use(**USE.get(variant, {})):
                        fc = configs.forward_config(d, d, torch.bfloat16, (arch // 10, arch % 10))
                        bc = configs.backward_config(d, d, torch.bfloat16, (arch // 10, arch % 10))
                    launches = forward.forward_launches(q, k, v, o, lse, stats, d ** -0.5, 0, *window, fc)
                    if "fwd+bwd" in h["modes"]:
                        launches += backward.backward_launches(do, q, k, v, o, stats, dq, dk, dv, delta, d ** -0.5,
                                                               0, *window, bc)
                    for kernel, _, _, kwargs in launches:
                        name = getattr(kernel, "fn", kernel).__name__
                        seen.add((name, tuple(sorted((k, str(v)) for k, v in kwargs.items()))))
    return len(seen)


def run_steps(steps, out: str) -> int:
    os.makedirs(out, exist_ok=True)
    failed = 0
    for name, budget, cmd in steps:
        start = time.time()
        with open(os.path.join(out, f"{name}.txt"), "w") as log:
            try:
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=budget).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            log.write(f"\n{name} rc={rc} in {time.time() - start:.0f} s\n")
        print(f"{name}: rc={rc} in {time.time() - start:.0f} s (budget {budget} s)", flush=True)
        failed += rc != 0
    return 1 if failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.session", description=__doc__.split("\n")[0])
    p.add_argument("--part", type=int, choices=[1, 2], required=True)
    p.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    p.add_argument("--from", dest="results", help="part 2: part 1's bench results.json")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the compile estimate; run nothing")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    steps = part1_steps(a.out) if a.part == 1 else part2_steps(a.out, a.results)
    if not a.dry_run:
        return run_steps(steps, a.out)
    for name, budget, cmd in steps:
        print(f"{name:14} <= {budget:3d} s  {' '.join(cmd[1:])}")
    print(f"steps' budgets: {sum(s[1] for s in steps)} s")
    if a.part == 1:
        n = benchmark_kernels()
        print(f"benchmark rows: {n} distinct fused_attn kernels to compile for sm_90, about {n * COMPILE_S:.0f} s at "
              f"{COMPILE_S} s each (the gate's rate on a 2-core CPU); the smoke tests add their own")
    return 0


if __name__ == "__main__":
    sys.exit(main())
