"""The compile-time gate (tests/aot_compile.py) in the suite: every kernel compiled for sm_90, sm_80 and the 99 KB
GPUs with the JIT's specializations of the benchmark shapes, and judged (wgmma, pipelined async loads, spills,
shared memory). Plus the gate's own judges on hand-written inputs, so a broken judge cannot pass silently."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import aot_compile as gate  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the suite compiles and runs the kernels itself")
def test_kernels_pass_the_compile_time_gate():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default every release so far; silences 3.9's notice
    out = subprocess.run([sys.executable, str(Path(gate.__file__))], env=env, capture_output=True, text=True,
                         timeout=1800)
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("sm_90 ") >= 150 and out.stdout.count("smoke sm_90") == 4, out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the suite compiles and runs the kernels itself")
def test_new_masks_lengths_and_mod_args_do_not_recompile():
    """Block masks of other functions and lengths, a float bias, @triton.jit mask and score functions with other
    mod_args: one compiled kernel each (for sm_90, by the JIT's own cache keys); a length of the other class of
    Sk % 16 == 0 compiles once more (the control: the count sees recompiles)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, str(Path(gate.__file__)), "--recompiles"], env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    for kind in ("python-mask", "jit-mask", "bias", "score-mod"):
        assert set(counts[kind].values()) == {1}, (kind, counts[kind])
    assert counts["python-mask-both-classes"]["_attn_fwd_kernel"] == 2


def test_loop_tile_loads_are_found():
    ttgir = """
    %q = tt.load %p : tensor<64x128x!tt.ptr<bf16>, #blocked>
    %r = scf.for %i = %c0 to %n step %c1 iter_args(%a = %z) -> (tensor<64x64xf32>) : i32 {
      %m = tt.load %s : tensor<64x!tt.ptr<f32>, #blocked>
      %x = scf.if %c -> (tensor<64x64xf32>) {
        %k = tt.load %kp : tensor<64x128x!tt.ptr<bf16>, #blocked>
        scf.yield %k
      } else {
        scf.yield %a
      }
    }
    %v = tt.load %vp : tensor<64x128x!tt.ptr<bf16>, #blocked>
    """
    assert gate._loop_tile_loads(ttgir) == 1  # only %k: %q and %v are outside the loop, %m is 1-D
    persistent = """
    scf.for %t = %p to %n step %programs : i32 {
      %q = tt.load %qp : tensor<64x128x!tt.ptr<bf16>, #blocked>
      %r = scf.for %i = %c0 to %n step %c1 iter_args(%a = %z) -> (tensor<64x64xf32>) : i32 {
        %k = tt.load %kp : tensor<64x128x!tt.ptr<bf16>, #blocked>
        scf.yield %k
      }
    }
    """
    assert gate._loop_tile_loads(persistent) == 1  # %k; %q is loaded once per tile of the walk


def test_verdicts():
    clean = dict(wgmma=12, mma=0, cp_async=40, tma=0, stages=3, sync_loads=0, spill=0, regs=200, smem=100_000)
    assert gate.verdict(90, torch.bfloat16, "_attn_fwd_kernel", clean) == []
    assert gate.verdict(90, torch.bfloat16, "_attn_fwd_kernel", dict(clean, spill=8)) == ["spills"]
    assert "mma.sync instead of wgmma" in gate.verdict(90, torch.float16, "_attn_bwd_dq_kernel",
                                                       dict(clean, mma=4))
    assert "loads not pipelined" in gate.verdict(90, torch.bfloat16, "_attn_fwd_kernel", dict(clean, stages=1))
    assert "synchronous tile loads in a loop" in gate.verdict(80, torch.bfloat16, "_attn_fwd_kernel",
                                                              dict(clean, mma=8, sync_loads=2))
    assert gate.verdict(86, torch.float32, "_attn_bwd_dkdv_kernel", dict(clean, smem=102_400)) == [
        "shared memory over the limit"]  # 99 KB on sm_86
    ampere = dict(clean, wgmma=0, mma=96)  # the 99 KB GPUs are judged as sm_80 is: mma.sync, pipelined, no spills
    assert gate.verdict(120, torch.bfloat16, "_attn_bwd_dq_kernel", ampere) == []
    assert gate.verdict(86, torch.bfloat16, "_attn_bwd_dq_kernel", dict(ampere, stages=1)) == ["loads not pipelined"]
    assert gate.verdict(89, torch.float16, "_attn_fwd_kernel", dict(ampere, mma=0)) == ["no mma.sync"]
    ws = dict(clean, warp_spec=True, partitions=1, setmaxnreg=8)  # warp specialization must show in the code
    assert gate.verdict(90, torch.bfloat16, "_attn_fwd_kernel", ws) == []
    assert gate.verdict(90, torch.bfloat16, "_attn_fwd_kernel", dict(ws, setmaxnreg=0)) == ["not warp-specialized"]
    assert gate.verdict(90, torch.float32, "_attn_fwd_kernel", dict(clean, spill=9000)) == []  # fp32: printed
    assert gate.verdict(90, torch.bfloat16, "_attn_fwd_kernel", dict(clean, tma_path=True)) == [
        "TMA path without cp.async.bulk.tensor"]
    assert gate.verdict(90, torch.bfloat16, "_attn_fwd_kernel", dict(clean, cp_async=0, tma=8, tma_path=True)) == []
    # FP8 (layouts "fp8"): every product on FP8 operands -- wgmma on sm_90, tcgen05 on sm_100, mma.sync on sm_89
    fp8 = dict(clean, layouts="fp8", wgmma_fp8=12)
    assert gate.verdict(90, torch.bfloat16, "_attn_fwd_kernel", fp8) == []
    assert gate.verdict(90, torch.bfloat16, "_attn_fwd_kernel", dict(fp8, wgmma_fp8=6)) == [
        "wgmma not on FP8 operands"]
    blackwell = dict(fp8, wgmma=0, wgmma_fp8=0, tcgen05=8, tmem=1, tcgen05_fp8=8)
    assert gate.verdict(100, torch.bfloat16, "_attn_fwd_kernel", blackwell) == []
    assert gate.verdict(100, torch.bfloat16, "_attn_fwd_kernel", dict(blackwell, tcgen05_fp8=0)) == [
        "tcgen05 not on FP8 operands"]
    assert gate.verdict(100, torch.bfloat16, "_attn_fwd_kernel", dict(blackwell, tmem=0)) == [
        "no tcgen05 MMAs with tensor memory"]
    ada = dict(fp8, wgmma=0, wgmma_fp8=0, mma=96, mma_fp8=96)
    assert gate.verdict(89, torch.bfloat16, "_attn_fwd_kernel", ada) == []
    assert gate.verdict(89, torch.bfloat16, "_attn_fwd_kernel", dict(ada, mma_fp8=48)) == [
        "mma.sync not on FP8 operands"]


def test_same_mma_judge():
    """The batch-invariant group's judge: the forward and split-KV kernels must agree on MMA and key tile; the
    combine kernel (no MMA) is not judged."""
    mma = "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 versionMajor = 3, versionMinor = 0, " \
          "warpsPerCTA = [8, 1], instrShape = [16, 64, 16]"
    rows = [dict(name="_attn_fwd_kernel", mma_kinds=mma, tiles=(64, 64)),
            dict(name="_attn_fwd_split_kernel", mma_kinds=mma, tiles=(64, 64)),
            dict(name="_attn_combine_kernel", mma_kinds="", tiles=(16, None))]
    assert gate.same_mma(rows) == []
    assert gate.same_mma(rows + [dict(rows[1], tiles=(64, 32))])
    assert gate.same_mma(rows + [dict(rows[1], mma_kinds="mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32")])
