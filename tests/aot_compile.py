"""The compile-time gate: compile every kernel for NVIDIA targets on a machine without a GPU, exactly as the JIT
would compile it for the benchmark shapes, and assert on the code Triton generates.

The launches are the launchers' own (forward_launches / backward_launches) on meta tensors with the benchmark's
shapes and strides (16k tokens, hidden 2048, S = 16384, contiguous "bhsd" and "bshd"; packed: 16k tokens in
8 sequences of at most 4096; decode: B = 8, one query row, Hq / Hkv = 32 / 8, a 32k cache, contiguous or in pages
of 256), compiled through the JIT's
warmup under a driver that names the target and owns no device. So the JIT's specializations apply as on a GPU:
unit strides become constants, 16-divisible pointers / strides / lengths are marked, group = 1 is a constant.

Asserted per kernel (forward, dK/dV, dQ; pointer and TMA paths):
  sm_90, fp16 / bf16: every dot a wgmma (no mma.sync), the tile loads inside the loops asynchronous (cp.async or
      TMA) and multi-buffered (pipelined), no synchronous tile load left in a loop, 0 bytes of spill stores;
  sm_80, fp16 / bf16: mma.sync, cp.async, the same pipelining, no spills;
  every target and dtype (fp32 included): shared memory within the target's per-block limit (99 KB on sm_86,
      sm_89, sm_120). fp32 kernels may spill; the table shows how much.
Every kernel takes at most MAX_PARAMS parameters (its bundles: launch.py), the table shows the count and the
values a launch passes (tuples flattened). A few compiles with no integer specialized (every stride and length an
opaque i32) run as a smoke test only.

    python tests/aot_compile.py [--quick]     one line per kernel; exit status 1 if an assertion fails
"""
import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

from fused_attn import batch_invariant
from fused_attn.kernels import backward, configs, decode, forward, launch

TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
MASKS = {"none": (-1, -1), "causal": (-1, 0), "window": (1023, 0)}  # window: Mistral sliding_window=1024
SEQLEN, TOKENS, HIDDEN = 16384, 16384, 2048
PACKED_SEQS = 8  # packed jobs: TOKENS in 8 sequences of at most 2 * TOKENS / 8
DOT_KERNELS = ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")
DECODE_KERNELS = ("_attn_fwd_split_kernel",)
MAX_PARAMS = 24  # a kernel's parameters: the bundles (fused_attn/kernels/launch.py) keep each list short  # memory-bound (one query row): judged on its loads and spills


class TargetOnly:
    """A driver that names a GPU target for the JIT and owns no device: warmup compiles, nothing launches.
    The device id is the arch, so the JIT's per-device caches never mix targets."""

    def __init__(self, arch: int):
        self.arch, self.target = arch, GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def is_active(self):
        return True


def jobs(quick: bool):
    """(arch, dtype, D, mask, group, tma, longest_first, kind) per launch set, kind "dense", "persistent" (the dense
    kernels as persistent programs), "packed" (varlen),
    "decode" or "paged" (split-KV over a contiguous / paged cache), "serving" / "serving-fp8" (a packed step over
    a paged cache, bf16 / FP8 caches), "modifiers" (the dense kernels with softcap, ALiBi, dropout and sinks all
    on), "blockmask" (the kernels walking a block mask's lists); the dense layouts are compiled inside each job.
    sm_90 bf16: every benchmark shape (D x masks x MHA / GQA 8) on both load paths; fp16 generates the same code
    with another element type: causal MHA at every D on both paths. Packed sequences (the VARLEN kernels, pointer
    path): sm_90 bf16 causal at every D, GQA 8 with a window, sm_80 bf16. Decoding: sm_90 and sm_80 bf16 at every
    D, contiguous and paged. Serving: sm_90 and sm_80, D = 64 / 128, GQA 8, bf16 and FP8 caches. Modifiers: sm_90
    bf16 causal D = 64 / 128, sm_80 GQA 8. sm_80: bf16 GQA 8 and fp32. The 99 KB GPUs: bf16 and fp32 (sm_89
    compiles as sm_86 does, so only its largest tiles, D = 256)."""
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    masks = ("causal",) if quick else tuple(MASKS)
    out = []
    for d in (128,) if quick else (64, 128, 256):
        for tma in (False, True):
            out += [(90, bf16, d, m, group, tma, False) for m in masks for group in (1, 8)]
            out.append((90, fp16, d, "causal", 1, tma, False))
        out.append((90, bf16, d, "causal", 1, False, True))  # longest-first tile order: fwd and dQ reversed
        out.append((90, fp32, d, "causal", 1, False, False))
        out.append((80, bf16, d, "causal", 8, False, False))
        out += [(arch, dt, d, "causal", 1, False, False) for arch in (86, 120) for dt in (bf16, fp32)]
        out.append((90, bf16, d, "causal", 1, False, False, "packed"))
    out += [(arch, dt, 256, "causal", 1, False, False) for arch, dt in ((80, fp32), (89, bf16), (89, fp32))]
    out += [(90, bf16, 128, "window", 8, False, False, "packed"), (80, bf16, 128, "causal", 8, False, False, "packed")]
    out += [(arch, bf16, d, "causal", 4, False, False, kind) for arch in (80, 90) for d in (64, 128, 256)
            for kind in ("decode", "paged")]
    out += [(86, bf16, 256, "causal", 4, False, False, kind) for kind in ("decode", "paged")]
    # Serving: a packed step over a paged cache, bf16 and FP8 caches (e4m3; e5m2 on sm_80: no e4m3 before sm_89).
    out += [(arch, bf16, d, "causal", 8, False, False, kind) for arch in (80, 90) for d in (64, 128)
            for kind in ("serving", "serving-fp8")]
    # The FP8 forward (e4m3 q, k, v; the dtype field names the output): sm_90, and sm_89 / sm_120 at D = 128.
    out += [(90, bf16, d, m, 8, False, False, "fp8") for d in (64, 128, 256) for m in ("none", "causal")]
    out += [(arch, bf16, 128, "causal", 8, False, False, "fp8") for arch in (89, 120)]  # FP8 mma.sync (99 KB GPUs)
    # Persistent kernels (one program per SM walking the tiles heaviest first): forward, dK/dV, dQ.
    out += [(90, bf16, d, "causal", g, True, False, "persistent") for d in (64, 128, 256) for g in (1, 8)]
    out.append((80, bf16, 128, "causal", 8, False, False, "persistent"))
    # The warp-specialized kernels (descriptors made in the kernel, a producer warp group beside the consumers).
    out += [(90, bf16, d, m, g, True, False, "ws") for d in (64, 128, 256) for m in ("none", "causal") for g in (1, 8)]
    out += [(90, bf16, d, "causal", 8, True, False, "ws-persistent") for d in (64, 128, 256)]
    out += [(90, bf16, d, "causal", 1, False, False, "modifiers") for d in (64, 128)]
    out.append((80, bf16, 128, "causal", 8, False, False, "modifiers"))
    # Block masks (flex_attention): the list walk over 128 x 128 mask blocks, sm_90 D = 64 / 128, with Triton >= 3.7
    # (3.6 leaves the partial blocks' uint8 bits loads synchronous in the forward and dQ kernels; sm_80 is not
    # judged yet either: its cp.async pipeliner leaves the list walk's K / V loads single-buffered -- the address
    # depends on a scalar load of the block index. Adding those jobs shows both.)
    if tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 7):
        out += [(90, bf16, d, "none", 1, False, False, "blockmask") for d in (64, 128)]
        out.append((90, bf16, 128, "none", 1, False, False, "bias"))
        # Blackwell (sm_100a, B200 / GB200): the dense kernels (Hopper's tables but BLACKWELL's) and the FP8
        # forward, as tcgen05 MMAs with tensor memory. Triton 3.6's sm_100 code caps some kernels at 128 registers
        # and spills (12-28 bytes): judged with >= 3.7 only.
        out += [(100, bf16, d, "causal", group, False, False) for d in (64, 128, 256) for group in (1, 8)]
        out.append((100, bf16, 128, "causal", 8, False, False, "fp8"))
        out += [(100, bf16, d, "causal", 8, True, False, kind) for d in (64, 128, 256) for kind in ("dense",
                                                                                                   "persistent")]
        out += [(100, bf16, d, "causal", 8, True, False, "ws") for d in (64, 128)]
    # The batch-invariant mode: every path that computes a row (dense and packed forward, split-KV decode and
    # serving) must compile to the same MMAs on the same key tile (invariant_launch_list, the group check).
    out += [(90, bf16, d, "causal", 8, False, False, "invariant") for d in (64, 128, 256)]
    out.append((80, bf16, 128, "causal", 8, False, False, "invariant"))
    return [j + ("dense",) * (8 - len(j)) for j in out]


def _meta(shape_bhsd, dtype, layout):
    B, H, S, D = shape_bhsd
    if layout == "bshd":
        return torch.empty(B, S, H, D, dtype=dtype, device="meta").transpose(1, 2)
    return torch.empty(B, H, S, D, dtype=dtype, device="meta")


def launch_list(arch, dtype, d, mask, group, tma, longest_first, kind, layout):
    """The launchers' launches for the benchmark shape, on meta tensors (layout "packed": the varlen views)."""
    if kind in ("decode", "paged"):
        return decode_launch_list(arch, dtype, d, mask, group, kind == "paged")
    if kind in ("serving", "serving-fp8"):
        return serving_launch_list(arch, dtype, d, mask, group, kind == "serving-fp8")
    if kind == "fp8":
        return fp8_launch_list(arch, d, mask, group, layout)
    if kind == "invariant":
        return invariant_launch_list(arch, dtype, d, mask, group)
    packed = kind == "packed"
    cc = (arch // 10, arch % 10)
    B, S, Hq = (1, TOKENS, HIDDEN // d) if packed else (TOKENS // SEQLEN, SEQLEN, HIDDEN // d)
    Hkv = Hq // group
    layout = "bshd" if packed else layout
    q, o, do, dq = (_meta((B, Hq, S, d), dtype, layout) for _ in range(4))
    k, v, dk, dv = (_meta((B, Hkv, S, d), dtype, layout) for _ in range(4))
    lse, delta = (torch.empty(B, Hq, S, device="meta") for _ in range(2))
    stats = torch.empty(B, Hq, S, 2, device="meta")
    left, right = MASKS[mask]
    with configs.use(tma=tma, longest_first=longest_first, persistent=kind in ("persistent", "ws-persistent"),
                     warp_specialize=kind in ("ws", "ws-persistent")):
        fc = configs.forward_config(d, d, dtype, cc, packed=packed)
        bc = configs.backward_config(d, d, dtype, cc, packed=packed, dropout=kind == "modifiers")
    args = (d ** -0.5, 0, left, right)
    cu = torch.empty(PACKED_SEQS + 1, dtype=torch.int32, device="meta")
    pk = launch.Packed(cu, cu, TOKENS // PACKED_SEQS * 2, TOKENS // PACKED_SEQS * 2) if packed else None
    blocks = _document_tables(S) if kind == "blockmask" else None
    mods = dbias = dsink = None
    if kind == "bias":  # a float attn_mask with its gradient: the score function _add_bias, dS written, its -inf blocks
        blocks = _document_tables(S)
        mods = launch.Modifiers(bias=torch.empty(S, S, dtype=dtype, device="meta").expand(B, Hq, S, S))
        dbias = torch.empty(B, Hq, S, S, device="meta")
    if kind == "modifiers":
        mods = launch.Modifiers(50.0, torch.empty(Hq, device="meta"), 0.1,
                                 torch.empty(2, dtype=torch.int64, device="meta"), sinks=torch.empty(Hq, device="meta"))
        dsink = torch.empty(B, Hq, S, device="meta")
    if kind in ("ws", "ws-persistent"):  # warp specialization: the forward and dQ kernels
        return forward.forward_launches(q, k, v, o, lse, stats, *args, fc, pk, mods, blocks) + [
            launch for launch in backward.backward_launches(do, q, k, v, o, stats, dq, dk, dv, delta, *args, bc, pk,
                                                            mods, blocks)
            if launch[0].fn.__name__ != "_attn_bwd_preprocess_kernel"]
    return (forward.forward_launches(q, k, v, o, lse, stats, *args, fc, pk, mods, blocks)
            + backward.backward_launches(do, q, k, v, o, stats, dq, dk, dv, delta, *args, bc, pk, mods, blocks,
                                         dbias, dsink))


def _document_tables(S):
    """A document-style block mask's tables (meta): their shapes for 128 x 128 blocks, 300 partial blocks."""
    nq, nk, meta = S // 128, S // 128, dict(device="meta", dtype=torch.int32)
    return launch.BlockTables(*(torch.empty(1, 1, n, -(-(3 + m) // 16) * 16, **meta)
                                for n, m in ((nq, nk),) * 2 + ((nk, nq),) * 2),
                              torch.empty(300, 128, 128, dtype=torch.uint8, device="meta"), 128, 128)


DECODE = dict(batch=8, heads=32, cache=32768, page=256, splits=8)


def decode_launch_list(arch, dtype, d, mask, group, paged):
    """Split-KV launches for one query row against the decode cache: with 8 splits (so the combine kernel too) and
    with none (the split kernel's other COMBINE variant: the one short caches and full batches take)."""
    B, Hq, S, P = DECODE["batch"], DECODE["heads"], DECODE["cache"], DECODE["page"]
    q, o = (_meta((B, Hq, 1, d), dtype, "bshd") for _ in range(2))
    shape = (B * S // P, Hq // group, P, d) if paged else (B, Hq // group, S, d)
    k, v = (_meta(shape, dtype, "bshd") for _ in range(2))
    lse = torch.empty(B, Hq, 1, device="meta")
    seqlens = torch.empty(B, dtype=torch.int32, device="meta")
    table = torch.empty(B, S // P, dtype=torch.int32, device="meta") if paged else None
    return [launch for splits in (DECODE["splits"], 1)
            for launch in decode.decode_launches(q, k, v, o, lse, seqlens, table, P if paged else 0, S, d ** -0.5,
                                                 *MASKS[mask], splits, (arch // 10, arch % 10))]


SERVING = dict(seqs=64, tokens=2048 + 63, max_q=2048, cache=32768, page=16)


def serving_launch_list(arch, dtype, d, mask, group, fp8):
    """A serving step (attention_varlen over a paged cache): 64 sequences -- a 2,048-query chunk and 63 decodes --
    over caches of up to 32k keys in pages of 16, with sinks; fp8: FP8 caches with descales (e4m3; e5m2 before
    sm_89, which has no e4m3). Then the cache write of the step's new keys (write_kv_cache's kernel)."""
    n, T, P, S = SERVING["seqs"], SERVING["tokens"], SERVING["page"], SERVING["cache"]
    Hq = HIDDEN // d
    cache_dtype = (torch.float8_e4m3fn if arch >= 89 else torch.float8_e5m2) if fp8 else dtype
    q, o = (_meta((1, Hq, T, d), dtype, "bshd") for _ in range(2))
    k, v = (_meta((n * S // P, Hq // group, P, d), cache_dtype, "bshd") for _ in range(2))
    lse = torch.empty(1, Hq, T, device="meta")
    i32 = dict(dtype=torch.int32, device="meta")
    cu, used, table = torch.empty(n + 1, **i32), torch.empty(n, **i32), torch.empty(n, S // P, **i32)
    descale = torch.empty(n, Hq // group, device="meta") if fp8 else None
    mods = launch.Modifiers(sinks=torch.empty(Hq, device="meta"), k_descale=descale, v_descale=descale)
    packed = launch.Packed(cu, None, SERVING["max_q"], S)
    new_k = torch.empty(T, Hq // group, d, dtype=dtype, device="meta")
    scale = torch.empty(1, device="meta") if fp8 else None
    from fused_attn.kernels import cache
    # As planned (num_splits=0: 64 sequences fill the SMs, no split) and split 8 ways (the combine kernel too).
    return ([launch for splits in (0, 8)
             for launch in decode.decode_launches(q, k, v, o, lse, used, table, P, S, d ** -0.5, *MASKS[mask], splits,
                                                  (arch // 10, arch % 10), mods, packed)]
            + cache.write_launches(new_k, new_k, k.transpose(1, 2), v.transpose(1, 2),
                                   torch.empty(T, dtype=torch.int64, device="meta"), scale, scale))


def invariant_launch_list(arch, dtype, d, mask, group):
    """The batch-invariant mode's launches (its default split size) of every path that computes a row: the dense
    forward (16k tokens), the packed forward (8 sequences), split-KV decoding over a contiguous cache (8 splits) and
    a serving step over a paged cache with sinks."""
    cc, split = (arch // 10, arch % 10), batch_invariant.DEFAULT_SPLIT_SIZE
    cfg = configs.invariant_config(d, d, dtype, cc, split)
    Hq = HIDDEN // d
    out = []
    for packed in (False, True):
        B, S = (1, TOKENS) if packed else (TOKENS // SEQLEN, SEQLEN)
        q, o = (_meta((B, Hq, S, d), dtype, "bshd") for _ in range(2))
        k, v = (_meta((B, Hq // group, S, d), dtype, "bshd") for _ in range(2))
        lse, stats = torch.empty(B, Hq, S, device="meta"), torch.empty(B, Hq, S, 2, device="meta")
        cu = torch.empty(PACKED_SEQS + 1, dtype=torch.int32, device="meta")
        pk = launch.Packed(cu, cu, TOKENS // PACKED_SEQS * 2, TOKENS // PACKED_SEQS * 2) if packed else None
        out += forward.forward_launches(q, k, v, o, lse, stats, d ** -0.5, 0, *MASKS[mask], cfg, pk,
                                        split_keys=split)
    B, S = DECODE["batch"], DECODE["cache"]
    q, o = (_meta((B, Hq, 1, d), dtype, "bshd") for _ in range(2))
    k, v = (_meta((B, Hq // group, S, d), dtype, "bshd") for _ in range(2))
    out += decode.decode_launches(q, k, v, o, torch.empty(B, Hq, 1, device="meta"),
                                  torch.empty(B, dtype=torch.int32, device="meta"), None, 0, S, d ** -0.5,
                                  *MASKS[mask], 0, cc, split_keys=split)
    n, T, P = SERVING["seqs"], SERVING["tokens"], SERVING["page"]
    q, o = (_meta((1, Hq, T, d), dtype, "bshd") for _ in range(2))
    k, v = (_meta((n * S // P, Hq // group, P, d), dtype, "bshd") for _ in range(2))
    i32 = dict(dtype=torch.int32, device="meta")
    out += decode.decode_launches(q, k, v, o, torch.empty(1, Hq, T, device="meta"), torch.empty(n, **i32),
                                  torch.empty(n, S // P, **i32), P, S, d ** -0.5, *MASKS[mask], 0, cc,
                                  launch.Modifiers(sinks=torch.empty(Hq, device="meta")),
                                  launch.Packed(torch.empty(n + 1, **i32), None, SERVING["max_q"], S),
                                  split_keys=split)
    return out


def same_mma(rows) -> list:
    """The batch-invariant group's check: every kernel that computes rows (forward, split-KV) runs the same MMA
    instructions (kind and shape, from the PTX; the MMA layout's version and instruction shape, from the TTGIR) on
    the same key tile. The failures to add to each row, or none."""
    kinds = {(r["mma_kinds"], r["tiles"][1]) for r in rows if r["name"] in DOT_KERNELS + DECODE_KERNELS}
    return [] if len(kinds) == 1 else [f"paths differ in MMA / key tile: {sorted(kinds)}"]


def fp8_launch_list(arch, d, mask, group, layout):
    """The FP8 forward (forward only) on the benchmark shape: e4m3 q, k, v with (B, Hkv) descales, bf16 out."""
    cc = (arch // 10, arch % 10)
    B, S, Hq = TOKENS // SEQLEN, SEQLEN, HIDDEN // d
    fp8 = torch.float8_e4m3fn
    q = _meta((B, Hq, S, d), fp8, layout)
    k = _meta((B, Hq // group, S, d), fp8, layout)
    v = torch.empty(B, Hq // group, d, S, dtype=fp8, device="meta").transpose(2, 3)  # keys contiguous (fp8_values)
    o = _meta((B, Hq, S, d), torch.bfloat16, layout)
    lse, stats = torch.empty(B, Hq, S, device="meta"), torch.empty(B, Hq, S, 2, device="meta")
    descale = torch.empty(B, Hq // group, device="meta")
    mods = launch.Modifiers(q_descale=descale, k_descale=descale, v_descale=descale)
    with configs.use(tma=False):
        fc = configs.forward_config(d, d, fp8, cc)
    return forward.forward_launches(q, k, v, o, lse, stats, d ** -0.5, 0, *MASKS[mask], fc, None, mods)


def _loop_tile_loads(ttgir: str) -> int:
    """Synchronous loads of 2-D tiles inside innermost scf.for loops (a tile load the pipeliner did not make async).
    Loads in a loop around other loops -- a persistent kernel's walk over tiles, loading each tile's resident q --
    are once per tile, as outside any loop in a one-tile program."""
    stack, count = [], 0  # per open region: [is a for loop, its 2-D loads, contains a loop]
    for line in ttgir.splitlines():
        s = line.strip()
        if s.startswith("}") and stack:
            is_for, loads, has_loop = stack.pop()
            if is_for and not has_loop:
                count += loads
        loops = [frame for frame in stack if frame[0]]
        if "tt.load" in s and re.search(r"tensor<\d+x\d+x", s) and loops:
            loops[-1][1] += 1  # the innermost loop around it (through any scf.if)
        if s.endswith("{"):
            is_for = "scf.for" in s
            if is_for:
                for frame in stack:
                    frame[2] = True
            stack.append([is_for, 0, False])
    return count


def inspect(compiled, log: str) -> dict:
    ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
    spill = re.search(r"(\d+) bytes spill stores", log)
    regs = re.search(r"Used (\d+) registers", log)
    buffers = [int(n) for n in re.findall(r"ttg\.local_alloc : \(\) -> !ttg\.memdesc<(\d+)x\d+x\d+x", ttgir)]
    return dict(
        wgmma=ptx.count("wgmma.mma_async"), mma=len(re.findall(r"\bmma\.sync", ptx)),
        tcgen05=ptx.count("tcgen05.mma"), tmem=ptx.count("tcgen05.alloc"), setmaxnreg=ptx.count("setmaxnreg"),
        partitions=ttgir.count("ttg.warp_specialize"),
        wgmma_fp8=len(re.findall(r"wgmma\.mma_async[.\w]*\.e[45]m[23]\.e[45]m[23]", ptx)),
        tcgen05_fp8=len(re.findall(r"tcgen05\.mma[.\w:]*kind::f8f6f4", ptx)),
        mma_fp8=len(re.findall(r"\bmma\.sync[.\w]*\.e[45]m[23]\.e[45]m[23]", ptx)),
        cp_async=len(re.findall(r"cp\.async\.c[ag]\.shared", ptx)), tma=ptx.count("cp.async.bulk.tensor"),
        stages=max(buffers, default=1), sync_loads=_loop_tile_loads(ttgir),
        spill=int(spill.group(1)) if spill else -1, regs=int(regs.group(1)) if regs else -1,
        smem=compiled.metadata.shared,
        mma_kinds=" ".join(sorted(set(re.findall(r"(?:wgmma\.mma_async|\bmma\.sync|tcgen05\.mma)[.\w:]*", ptx))
                                  | set(re.findall(r"versionMajor = \d+, versionMinor = \d+.*?instrShape = \[[\d, ]+\]",
                                                   ttgir)))))


def _streamed(r) -> list:
    """What fails of the tile loads and registers: every loop's tile loads asynchronous, multi-buffered, no spills."""
    bad = []
    if r["cp_async"] + r["tma"] == 0 or r["sync_loads"]:
        bad.append("synchronous tile loads in a loop")
    if r["stages"] < 2:
        bad.append("loads not pipelined")
    if r["spill"]:
        bad.append("spills")
    return bad


def verdict(arch, dtype, name, r) -> list:
    """What fails for this kernel (empty: clean)."""
    bad = []
    if r.get("params", 0) > MAX_PARAMS:
        bad.append(f"{r['params']} parameters (at most {MAX_PARAMS}: pass bundles)")
    if r["smem"] > configs.smem_limit((arch // 10, arch % 10)):
        bad.append("shared memory over the limit")
    if r["spill"] < 0:
        bad.append("no ptxas report")
    if r.get("layouts") == "fp8" and arch in (89, 120):  # Ada / consumer Blackwell: FP8 mma.sync, pipelined
        if r["mma_fp8"] == 0 or r["mma_fp8"] != r["mma"]:
            bad.append("mma.sync not on FP8 operands")
        if r["cp_async"] == 0 or r["sync_loads"]:
            bad.append("synchronous tile loads in a loop")
        if r["spill"]:
            bad.append("spills")
    if r.get("warp_spec") and (r["partitions"] == 0 or r["setmaxnreg"] == 0):
        bad.append("not warp-specialized")  # separate partitions, registers moved between them (setmaxnreg)
    if dtype == torch.float32 or name not in DOT_KERNELS + DECODE_KERNELS or (r.get("layouts") == "fp8"
                                                                               and arch in (89, 120)):
        return bad  # fp32 (spills printed only), other kernels, the FP8 mma.sync rule above
    if arch == 100:  # Blackwell's own tensor-core path: tcgen05 MMAs accumulating in tensor memory
        if r["tcgen05"] == 0 or r["tmem"] == 0 or r["wgmma"] or r["mma"]:
            bad.append("no tcgen05 MMAs with tensor memory")
        if r.get("layouts") == "fp8" and r["tcgen05_fp8"] != r["tcgen05"]:
            bad.append("tcgen05 not on FP8 operands")
        return bad + _streamed(r)
    if name in DECODE_KERNELS:  # mma.sync for its 16-row tiles; K / V streamed asynchronously, without spills
        return bad + _streamed(r)
    if arch == 90 and (r["wgmma"] == 0 or r["mma"]):
        bad.append("mma.sync instead of wgmma")
    if r.get("layouts") == "fp8" and r["wgmma_fp8"] != r["wgmma"]:  # both products on FP8 operands
        bad.append("wgmma not on FP8 operands")
    if arch < 90 or arch >= 120:  # sm_80 and the 99 KB GPUs (sm_86, sm_89, sm_120): mma.sync tensor cores
        if r["mma"] == 0 or r["wgmma"]:
            bad.append("no mma.sync")
    if r.get("tma_path") and r["tma"] == 0:
        bad.append("TMA path without cp.async.bulk.tensor")
    return bad + _streamed(r)


def _part(tile) -> str:
    """Which launch of a split dK/dV this is ("" for a kernel that does all its work in one launch)."""
    if tile.WITH_DK and tile.WITH_DV:
        return ""
    return ":dk" if tile.WITH_DK else ":dv"


# Verdicts the gate prints but does not fail on, each an open item (README, Status): (kind, kernel, verdict), or
# (kind, kernel, verdict, arch, D) where it holds for one target and head dim only.
KNOWN = {
    # dK/dV reads a float bias transposed (key rows x query columns, the bias's contiguous axis along the rows):
    # that tile load stays synchronous; the forward and dQ kernels read it pipelined.
    ("bias", "_attn_bwd_dkdv_kernel", "synchronous tile loads in a loop"),
    # The batch-invariant forward at D = 256 (sm_90) keeps the merged splits' output and stats beside the split's
    # own: 64 x 16 tiles still spill 44 bytes in one layout (32-row tiles lose wgmma and pipelining). A cost of
    # the mode, not of its results; the split-KV kernels of the same tiles are clean.
    ("invariant", "_attn_fwd_kernel", "spills", 90, 256),
}

_ptxas_logs = {}  # per worker: the JIT's cache returns a compiled kernel again without running ptxas again


def compile_job(job):
    arch, dtype, d, mask, group, tma, longest_first, kind = job
    driver.set_active(TargetOnly(arch))
    knobs.nvidia.dump_ptxas_log = True
    seen, rows = {}, []
    for layout in ("bhsd", "bshd") if kind == "dense" else (kind,):
        for kernel, grid, args, kwargs in launch_list(*job, layout):
            log = io.StringIO()
            with contextlib.redirect_stdout(log):
                compiled = kernel.warmup(*args, grid=grid, **kwargs)
            if id(compiled) in seen:  # the JIT's cache: this layout specializes exactly as the other did
                seen[id(compiled)]["layouts"] += "+" + layout
                continue
            r = inspect(compiled, _ptxas_logs.setdefault(id(compiled), log.getvalue()))
            tile = launch.tile_of(kwargs)
            r.update(name=compiled.name, layouts=layout, tiles=(tile.BLOCK_M, tile.BLOCK_N) if "C" in kwargs else (
                         kwargs.get("BLOCK_M"), kwargs.get("BLOCK_N")),
                     warps=compiled.metadata.num_warps, num_stages=compiled.metadata.num_stages,
                     tma_path=bool(tile.TMA), part=_part(tile), warp_spec=bool(tile.WARP_SPEC),
                     params=len(kernel.arg_names), launch_args=launch.launch_values(args))
            r["bad"] = verdict(arch, dtype, r["name"], r)
            r["known"] = [b for b in r["bad"]
                          if (kind, r["name"], b) in KNOWN or (kind, r["name"], b, arch, d) in KNOWN]
            r["bad"] = [b for b in r["bad"] if b not in r["known"]]
            seen[id(compiled)] = r
            rows.append(r)
    if kind == "invariant":
        for r in rows:
            r["bad"] += same_mma(rows)
    return job, rows


def fmt(job, r) -> str:
    arch, dtype, d, mask, group, tma, longest_first, kind = job
    kname = r["name"].replace("_attn_", "").replace("_kernel", "").replace("bwd_", "") + r.get("part", "")
    path = ("tma" if r["tma_path"] else "ptr") + ("+lf" if longest_first else "")
    return (f"sm_{arch:<3} {TYPES[dtype]} D={d:<3} {mask:6} g={group} {path:6} {kname:13} {r['layouts']:9} "
            f"tile={r['tiles'][0]}x{r['tiles'][1]} w={r['warps']} s={r['num_stages']} | wgmma={r['wgmma']:<3} "
            f"mma.sync={r['mma']:<3} cp.async={r['cp_async']:<3} tma={r['tma']:<2} buffers={r['stages']} "
            f"sync-loop-loads={r['sync_loads']}{' setmaxnreg=%d' % r['setmaxnreg'] if r['setmaxnreg'] else ''} "
            f"| regs={r['regs']:<3} spill={r['spill']:<5} smem={r['smem']:6} "
            f"params={r.get('params', '-')} args={r.get('launch_args', '-')} "
            f"| {'ok' if not r['bad'] else 'FAIL: ' + ', '.join(r['bad'])}"
            f"{' (known: ' + ', '.join(r['known']) + ')' if r.get('known') else ''}")


def _opaque(arg):
    """arg with every int that is not a flag made 17 (neither 1 nor a multiple of 16: Triton specializes neither)."""
    if isinstance(arg, tuple):
        return type(arg)(*map(_opaque, arg)) if hasattr(arg, "_fields") else tuple(map(_opaque, arg))
    return 17 if isinstance(arg, int) and not isinstance(arg, bool) else arg


def smoke(_=None):
    """Compiles with no integer specialized (every stride, length and count an opaque i32, the window bounded on
    both sides): they must compile, their code is not judged."""
    driver.set_active(TargetOnly(90))
    lines = []
    for kernel, grid, args, kwargs in launch_list(90, torch.bfloat16, 80, "window", 2, False, False, "dense", "bhsd"):
        if "F" in kwargs and "HAS_LEFT" in kwargs["F"]._fields:
            kwargs = dict(kwargs, F=kwargs["F"]._replace(HAS_LEFT=True, HAS_RIGHT=True))
        c = kernel.warmup(*map(_opaque, args), grid=grid, **kwargs)
        lines.append(f"smoke sm_90 bf16 D=80 opaque integers {c.name}: compiled, smem={c.metadata.shared}")
    return lines


def recompiles() -> dict:
    """Distinct kernels the JIT compiles for sm_90 (bf16, D = 64, pointer loads) across attention calls that differ
    only in data: block masks of other functions and other lengths (all Sk % 16 == 8: the JIT specializes an int on
    divisibility by 16, so a length in the other class compiles each kernel once more), a float bias, a
    @triton.jit mask function with other mod_args, a @triton.jit score function with other mod_args; and, as the
    control that the count sees a recompile, lengths of both classes. Returns, per group of calls, the number of
    distinct compiled kernels per kernel name."""
    from fused_attn import blockmask
    driver.set_active(TargetOnly(90))

    @triton.jit
    def window_jit(b, h, q_idx, kv_idx, W):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < W)

    @triton.jit
    def score_jit(score, b, h, q_idx, kv_idx, SLOPE):
        return score - tl.load(SLOPE + h) * (q_idx - kv_idx)

    def calls(S, kind, n):
        docs = (lambda b, h, q, kv: (q // (S // n) == kv // (S // n)) & (q >= kv))
        tables = blockmask.create_block_mask(docs, None, None, S, S, "cpu", 64).tables
        if kind == "jit-mask":  # (its tables' values would come from running it: irrelevant to what compiles)
            tables = dataclasses.replace(tables, mask_mod=window_jit, mask_args=(n * 16,))
        q, o, do, dq, k, v, dk, dv = (_meta((2, 4, S, 64), torch.bfloat16, "bhsd") for _ in range(8))
        lse, delta = (torch.empty(2, 4, S, device="meta") for _ in range(2))
        stats = torch.empty(2, 4, S, 2, device="meta")
        mods, dbias = None, None
        if kind == "bias":
            mods = launch.Modifiers(bias=torch.empty(S, S, device="meta").expand(2, 4, S, S))
            dbias = torch.empty(2, 4, S, S, device="meta")
        elif kind == "score-mod":
            mods = launch.Modifiers(score_mod=launch.ScoreMod(score_jit), score_args=(torch.empty(4 * n),))
        args = (0.125, 0, -1, -1)
        with configs.use(tma=False):
            fc = configs.forward_config(64, 64, torch.bfloat16, (9, 0))
            bc = configs.backward_config(64, 64, torch.bfloat16, (9, 0))
        return (forward.forward_launches(q, k, v, o, lse, stats, *args, fc, None, mods, tables)
                + backward.backward_launches(do, q, k, v, o, stats, dq, dk, dv, delta, *args, bc, None, mods,
                                             tables, dbias))

    counts = {}
    same_class, both_classes = ((1000, 5), (1160, 8), (1320, 3)), ((1000, 5), (1024, 8))
    for kind, lengths in (("python-mask", same_class), ("jit-mask", same_class), ("bias", same_class),
                          ("score-mod", same_class), ("python-mask-both-classes", both_classes)):
        hashes = {}
        for S, n in lengths:
            for kernel, grid, args, kwargs in calls(S, kind.replace("-both-classes", ""), n):
                hashes.setdefault(kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__, set()).add(
                    kernel.warmup(*args, grid=grid, **kwargs).hash)
        counts[kind] = {name: len(h) for name, h in hashes.items()}
    return counts


def _selected(job, only) -> bool:
    arch, dtype, d, mask, group, tma, longest_first, kind = job
    fields = dict(arch=arch, dtype=TYPES[dtype], d=d, mask=mask, group=group, tma=int(tma), lf=int(longest_first),
                  kind=kind)
    return all(str(fields[k]) == v for k, v in (o.split("=", 1) for o in only))


def _worker_init(cache_root, shared=None, key=None):
    # A cache of its own per process: every first compile runs ptxas (whose -v report we read). shared: one cache
    # directory for all (--cache-dir: a GPU machine's own cache, warmed before its benchmarks). key: the cache key
    # of another build of this Triton (bench/travel_cache.py), under which the entries are stored.
    os.environ["TRITON_CACHE_DIR"] = shared or tempfile.mkdtemp(dir=cache_root)
    if key is not None:
        from triton.runtime import cache
        cache.triton_key = lambda: key


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="compile-time gate of the fused_attn kernels")
    p.add_argument("--quick", action="store_true", help="D = 128 and the causal mask only")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--recompiles", action="store_true", help="count the distinct kernels calls differing in data "
                   "compile (JSON), instead of the gate")
    p.add_argument("--only", nargs="+", default=[], metavar="KEY=VALUE",
                   help="restrict the jobs, e.g. arch=90 d=64 group=8 tma=1 dtype=bf16 mask=causal kind=packed")
    p.add_argument("--cache-dir", help="compile into this Triton cache, shared by the workers, instead of fresh "
                   "ones: on a GPU machine of the same target this warms the JIT's own cache (e.g. ~/.triton/cache) "
                   "in parallel for the benchmark shapes; kernels found there already report no ptxas log")
    p.add_argument("--triton-key-file", help="with --cache-dir: store the entries under the Triton cache key in this "
                   "file (another build of this Triton version: bench/travel_cache.py)")
    a = p.parse_args(argv)
    if a.recompiles:
        print(json.dumps(recompiles()))
        return 0
    print(f"triton {triton.__version__}, torch {torch.__version__}; S={SEQLEN}, {TOKENS} tokens, hidden {HIDDEN}")
    key = open(a.triton_key_file).read() if a.triton_key_file else None
    with tempfile.TemporaryDirectory(prefix="fused_attn_gate_") as cache_root, \
            ProcessPoolExecutor(a.workers, initializer=_worker_init, initargs=(cache_root, a.cache_dir, key)) as pool:
        smoke_lines = pool.submit(smoke)
        results = list(pool.map(compile_job, [j for j in jobs(a.quick) if _selected(j, a.only)]))
        smoke_lines = smoke_lines.result()
    n_bad = n = 0
    for job, rows in results:
        for r in rows:
            print(fmt(job, r))
            n += 1
            n_bad += bool(r["bad"])
    print("\n".join(smoke_lines))
    print(f"{n - n_bad} of {n} kernels clean")
    return 1 if n_bad else 0


if __name__ == "__main__":
    sys.exit(main())
