"""`python -m bench --host`: host time per call of every entry point, beside a tiny torch SDPA call (Sk = 16) timed
in the same run, as ratios (absolute microseconds on a shared machine are noise). On the CPU the kernels' launches
are stubbed (fused_attn.kernels.launch.stubbed_launches: the launch lists are built, nothing runs) and the value
checks that only CPU tensors get are off (a GPU skips them), so only our own Python on a GPU's path is timed; on a
GPU the launches are real (asynchronous: the call returns when they are queued). Also reports the positional
arguments of each launch (fewer make Triton's own launch cheaper)."""
import contextlib
import statistics
import time

import torch

import fused_attn
from fused_attn._args import without_value_checks
from fused_attn.kernels.launch import launch_values, stubbed_launches

CALLS = 300  # timed calls per entry (after WARMUP)
WARMUP = 20
PROVIDERS = {"fused_attn": None}  # the interface `python -m bench` checks; every entry is fused_attn's


def _entries(device):
    """name -> a function making one call, with its inputs made once (decode-sized and serving-sized shapes: the
    calls made per layer per token)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    rand = (lambda *s, grad=False: torch.randn(*s, generator=g).to(device, dtype).requires_grad_(grad))
    i32 = (lambda x: torch.tensor(x, dtype=torch.int32, device=device))
    q, k, v = rand(1, 8, 128, 64), rand(1, 2, 128, 64), rand(1, 2, 128, 64)
    qg, kg, vg = (rand(1, 8, 128, 64, grad=True), rand(1, 2, 128, 64, grad=True), rand(1, 2, 128, 64, grad=True))
    sq, sk = rand(1, 8, 1, 64), rand(1, 8, 16, 64)
    cu = i32([0, 60, 128])
    packed = (rand(128, 8, 64), rand(128, 2, 64), rand(128, 2, 64))
    decodes, page = 64, 16
    pages = torch.randperm(decodes * 8, generator=g).view(decodes, 8).to(device, torch.int32)
    k_pages, v_pages = rand(decodes * 8, page, 2, 64), rand(decodes * 8, page, 2, 64)
    q_dec, used, cu_dec = rand(decodes, 8, 64), i32([100] * decodes), i32(list(range(decodes + 1)))
    cache_k, cache_v = rand(4, 256, 2, 64), rand(4, 256, 2, 64)
    q_step, k_new, v_new, lens = rand(4, 1, 8, 64), rand(4, 1, 2, 64), rand(4, 1, 2, 64), i32([100, 37, 200, 5])
    mask = fused_attn.create_block_mask(lambda b, h, i, j: i >= j, 1, 1, 128, 128, device=device, BLOCK_SIZE=64)
    serving_meta = fused_attn.get_scheduler_metadata(decodes, 1, 128, 8, 2, 64, used, qkv_dtype=dtype,
                                                     cu_seqlens_q=cu_dec, page_size=page)
    step_meta = fused_attn.get_scheduler_metadata(4, 1, 256, 8, 2, 64, lens, qkv_dtype=dtype)

    def backward():
        out = fused_attn.attention(qg, kg, vg, causal=True)
        out.backward(torch.ones_like(out))

    return {
        "torch sdpa (Sk = 16)": lambda: torch.nn.functional.scaled_dot_product_attention(sq, sk, sk),
        "attention fwd": lambda: fused_attn.attention(q, k, v, causal=True),
        "attention fwd+bwd": backward,
        "attention_varlen": lambda: fused_attn.attention_varlen(*packed, cu, cu, 68, 68, causal=True),
        "serving (64 decodes, paged)": lambda: fused_attn.attention_varlen(
            q_dec, k_pages, v_pages, cu_dec, None, 1, 128, seqused_k=used, block_table=pages, causal=True),
        "kvcache decode": lambda: fused_attn.attention_with_kvcache(q_step, cache_k, cache_v, cache_seqlens=lens,
                                                                    causal=True),
        "kvcache decode + append": lambda: fused_attn.attention_with_kvcache(
            q_step, cache_k, cache_v, k_new, v_new, cache_seqlens=lens, causal=True),
        "flex (prebuilt BlockMask)": lambda: fused_attn.flex_attention(q, k, v, block_mask=mask, enable_gqa=True),
        "sdpa drop-in": lambda: fused_attn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        "flash_attn_func": lambda: fused_attn.flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)), causal=True),
        "flash_attn_varlen_func": lambda: fused_attn.flash_attn_varlen_func(*packed, cu, cu, 68, 68, causal=True),
        "flash_attn_with_kvcache": lambda: fused_attn.flash_attn_with_kvcache(q_step, cache_k, cache_v,
                                                                             cache_seqlens=lens, causal=True),
        # With the step's plan (get_scheduler_metadata, made once): the calls a server makes per layer.
        "serving + metadata": lambda: fused_attn.attention_varlen(
            q_dec, k_pages, v_pages, cu_dec, None, 1, 128, seqused_k=used, block_table=pages, causal=True,
            scheduler_metadata=serving_meta),
        "kvcache decode + metadata": lambda: fused_attn.attention_with_kvcache(
            q_step, cache_k, cache_v, cache_seqlens=lens, causal=True, scheduler_metadata=step_meta),
        "flash_attn_varlen_func + metadata": lambda: fused_attn.flash_attn_varlen_func(
            q_dec, k_pages, v_pages, cu_dec, None, 1, 128, seqused_k=used, block_table=pages, causal=True,
            scheduler_metadata=serving_meta),
        "flash_attn_with_kvcache + metadata": lambda: fused_attn.flash_attn_with_kvcache(
            q_step, cache_k, cache_v, cache_seqlens=lens, causal=True, scheduler_metadata=step_meta),
    }


ROUNDS = 5  # the entries are timed round after round, interleaved, so a slow spell of the machine hits them all


def time_call(fn, calls: int = CALLS, after=lambda: None) -> float:
    """Median microseconds of one call (each timed alone: the median ignores the machine's hiccups); after() runs
    between calls, untimed (the stub's log emptied: a log growing through the loop costs the garbage collector)."""
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        after()
    return statistics.median(times) * 1e6


def measure(device=None, calls: int = CALLS) -> list:
    """One row per entry: microseconds (the lowest of ROUNDS interleaved medians of calls / ROUNDS calls), ratio to
    the SDPA baseline timed the same way, launches per call and their positional arguments (largest)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    entries = _entries(device)
    cpu = device.type != "cuda"
    rows = []  # on the CPU: launches stubbed and the CPU-only value checks off, the host path a GPU takes
    with stubbed_launches() if cpu else contextlib.nullcontext([]) as log, \
            without_value_checks() if cpu else contextlib.nullcontext():
        for name, fn in entries.items():
            first = time.perf_counter()
            fn()  # the first call with this shape (compiles on a GPU; counted apart)
            first = (time.perf_counter() - first) * 1e6
            del log[:]
            fn()
            launches = list(log)
            for _ in range(WARMUP):
                fn()
            rows.append(dict(entry=name, first_us=first, launches=len(launches),
                             max_args=max((launch_values(args) for _, args in launches), default=0), stubbed=cpu))
        per_round = max(1, calls // ROUNDS)
        rounds = [[time_call(fn, per_round, log.clear) for fn in entries.values()] for _ in range(ROUNDS)]
    for i, row in enumerate(rows):  # the best round's median: the machine's noise only ever adds time
        row["us"] = min(r[i] for r in rounds)
    base = rows[0]["us"]
    for r in rows:
        r["ratio"] = r["us"] / base
    return rows


def table(rows) -> str:
    lines = [f"{'entry':36} {'us/call':>9} {'x sdpa':>7} {'launches':>8} {'args':>5}"]
    lines += [f"{r['entry']:36} {r['us']:9.1f} {r['ratio']:7.2f} {r['launches']:8d} {r['max_args']:5d}" for r in rows]
    return "\n".join(lines)
