"""Compile every kernel ahead of time for NVIDIA targets (sm_80, sm_90) with the configs the launchers pick, on
a machine without a GPU, and check the shared memory each needs fits the target. Run by test_compile.py in a
fresh process (the test session itself runs the kernels through the interpreter).

    python tests/aot_compile.py
"""
import sys
from concurrent.futures import ProcessPoolExecutor

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fused_attn.kernels import backward, configs, forward

SMEM_LIMIT = {80: 166_912, 90: 232_448}  # max dynamic shared memory per block
TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _signature(jit, dtype, constexprs):
    sig = {}
    for name in jit.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("LSE", "STATS", "DELTA"):
            sig[name] = "*fp32"
        elif name.isupper():
            sig[name] = "*" + TYPES[dtype]
        elif name in ("qk_scale", "scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def jobs():
    combos = [(90, torch.bfloat16, d, m) for d in (64, 128, 256) for m in ((False, False), (True, True))]
    combos += [(90, torch.float16, 80, (True, False)), (90, torch.float32, 256, (True, True)),
               (80, torch.float16, 128, (False, True)), (80, torch.float32, 256, (True, True))]
    for arch, dtype, d, (has_left, has_right) in combos:
        bd = configs.head_block(d)
        mask = dict(HAS_LEFT=has_left, HAS_RIGHT=has_right)
        fc = configs.forward_config(d, d, dtype, (arch // 10, arch % 10))
        bc = configs.backward_config(d, d, dtype, (arch // 10, arch % 10))
        shared = dict(HEAD_DIM=d, HEAD_DIM_V=d, BLOCK_D=bd, BLOCK_DV=bd, FP32_DOT=dtype == torch.float32)
        yield (arch, dtype, "fwd", dict(shared, BLOCK_M=fc.block_m, BLOCK_N=fc.block_n, **mask), fc)
        yield (arch, dtype, "dkdv", dict(shared, BLOCK_M=bc.block_m, BLOCK_N=bc.block_n, **mask), bc)
        yield (arch, dtype, "dq", dict(shared, BLOCK_M=bc.block_m, BLOCK_N=bc.block_n, **mask), bc)
        if has_left:
            yield (arch, dtype, "pre", dict(HEAD_DIM_V=d, BLOCK_M=bc.block_m, BLOCK_DV=bd), bc)


KERNELS = {"fwd": forward._attn_fwd_kernel, "dkdv": backward._attn_bwd_dkdv_kernel,
           "dq": backward._attn_bwd_dq_kernel, "pre": backward._attn_bwd_preprocess_kernel}


def compile_one(job):
    arch, dtype, name, constexprs, cfg = job
    kernel = KERNELS[name]
    jit = kernel if isinstance(kernel, triton.runtime.JITFunction) else kernel.fn  # under @triton.heuristics
    src = ASTSource(jit, _signature(jit, dtype, constexprs), constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    smem = compiled.metadata.shared
    ok = smem <= SMEM_LIMIT[arch]
    return ok, (f"sm_{arch} {TYPES[dtype]} {name:4} D={constexprs.get('HEAD_DIM', constexprs['HEAD_DIM_V']):3} "
                f"M={constexprs['BLOCK_M']:3} N={constexprs.get('BLOCK_N', '-'):>3} warps={cfg.num_warps} "
                f"stages={cfg.num_stages} smem={smem:6} {'ok' if ok else 'EXCEEDS ' + str(SMEM_LIMIT[arch])}")


def main():
    with ProcessPoolExecutor(2) as pool:
        results = list(pool.map(compile_one, list(jobs())))
    for _, line in results:
        print(line)
    return 0 if all(ok for ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
