"""Context parallelism (fused_attn.distributed) in spawned process groups: gloo on the CPU (the kernels through the
interpreter), NCCL where there are enough GPUs. One group per world size runs every case; each rank saves its
shards, and the test process puts them together and holds the whole sequence's out, lse, dq, dk, dv to the
tolerance rule against the float64 reference (numerics), as for `attention` itself."""
import datetime
import os
import zlib
from dataclasses import dataclass, replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fused_attn import kernels
from fused_attn.distributed import _group, ring_attention, shard_sequence, ulysses_attention, unshard_sequence
from fused_attn.distributed.sharding import assemble, shard_of
from fused_attn.testing import Case, _measure, kernel_modifiers, make_inputs

F16, F32 = torch.float16, torch.float32


@dataclass(frozen=True)
class CP:
    """A context-parallel case: `case` is the whole sequence (seqlen_q = seqlen_k), cut over `world` ranks."""
    scheme: str  # "ring" or "ulysses"
    world: int
    case: Case
    zigzag: bool = False
    twice: bool = False  # run twice and compared bitwise (determinism)

    @property
    def seed(self):  # the same in every process
        return zlib.crc32(self.id.encode())

    @property
    def id(self):
        return f"{self.scheme}{self.world}-" + ("zigzag-" if self.zigzag else "") + self.case.name


def _case(S, hq, hkv, dtype=F32, causal=False, window=(-1, -1), layout="bhsd", d=16, dv=None, batch=1):
    return Case(batch, hq, hkv, S, S, d, dv, dtype, causal, window, layout)


CASES = [
    # world 2: shards of 32 (zigzag: chunks of 16)
    CP("ring", 2, _case(64, 4, 2)),  # GQA, no mask
    CP("ring", 2, _case(64, 2, 2, causal=True, batch=2)),
    CP("ring", 2, _case(64, 4, 1, causal=True, d=24, dv=16), zigzag=True, twice=True),  # MQA, D != Dv, D = 24
    CP("ring", 2, _case(64, 2, 2, causal=True, window=(5, 0))),  # window shorter than a shard
    CP("ring", 2, _case(64, 4, 2, window=(7, 3), layout="bshd"), zigzag=True),
    CP("ring", 2, _case(64, 4, 2, dtype=F16, causal=True), zigzag=True),
    CP("ring", 2, _case(64, 2, 1, dtype=F16, window=(40, 20), layout="bshd")),
    CP("ulysses", 2, _case(64, 4, 2, causal=True)),
    # softcap and ALiBi: ring zigzag; ring with a two-sided window (exact diagonal offsets); Ulysses
    CP("ring", 2, replace(_case(64, 4, 2, causal=True), softcap=3.0, alibi="head"), zigzag=True),
    CP("ring", 2, replace(_case(64, 2, 1, window=(9, 4), batch=2), alibi="batch")),
    CP("ulysses", 2, replace(_case(64, 4, 2, causal=True, batch=2), softcap=3.0, alibi="batch")),
    CP("ulysses", 2, _case(64, 4, 1, dtype=F16, window=(6, 2), layout="bshd")),  # one kv head sent to both ranks
    # large logits (scaled scores ~1e3): the backward rebuilds P from the merged lse alone
    CP("ring", 2, replace(_case(64, 2, 2, causal=True), logit_scale=1000.0), zigzag=True),
    # world 4: shards of 32 (zigzag: chunks of 16)
    CP("ring", 4, _case(128, 4, 1, dtype=F16, causal=True), zigzag=True, twice=True),
    CP("ring", 4, _case(128, 2, 2, causal=True, window=(8, 0))),  # only neighbours' keys: the ring stops at step 1
    CP("ring", 4, _case(128, 4, 2, window=(20, 0), layout="bshd"), zigzag=True),
    CP("ring", 4, _case(128, 4, 2)),
    CP("ring", 4, replace(_case(128, 4, 2, window=(40, 0)), logit_scale=1000.0)),
    CP("ring", 4, replace(_case(128, 2, 1, dtype=F16), logit_scale=300.0), zigzag=True),
    CP("ulysses", 4, _case(128, 4, 2, causal=True)),
    CP("ulysses", 4, _case(128, 8, 4, dtype=F16, window=(9, 0))),
]


def _seq_dim(case):
    return 2 if case.layout == "bhsd" else 1


def _modifiers(case, device):
    mods = kernel_modifiers(case, case.batch, device)
    del mods["dropout_p"]
    return mods


def _run_case(cp, group, rank, device):
    case = cp.case
    q, k, v, do = make_inputs(case, device, seed=cp.seed)
    dim = _seq_dim(case)
    shards = [shard_of(t.detach(), dim, rank, cp.world, cp.zigzag).requires_grad_() for t in (q, k, v)]
    kw = dict(causal=case.causal, window_size=case.window, layout=case.layout, group=group, return_lse=True,
              **_modifiers(case, device))
    before, sent = dict(kernels.launches), dict(_group.exchanges)
    if cp.scheme == "ring":
        out, lse = ring_attention(*shards, zigzag=cp.zigzag, **kw)
    else:
        out, lse = ulysses_attention(*shards, **kw)
    fwd = kernels.launches["fwd"] - before.get("fwd", 0)
    out.backward(shard_of(do, dim, rank, cp.world, cp.zigzag))
    res = dict(out=out, lse=lse, **{n: t.grad for n, t in zip(("dq", "dk", "dv"), shards)})
    res = {n: t.detach().cpu() for n, t in res.items()}
    res["launches"] = dict(fwd=fwd, bwd=kernels.launches["bwd"] - before.get("bwd", 0))
    res["exchanges"] = {n: _group.exchanges[n] - sent.get(n, 0) for n in _group.exchanges}
    return res


def _error(fn):
    try:
        fn()
    except (ValueError, TypeError) as e:
        return type(e).__name__, str(e)
    return None


def _errors(group, rank, world, device):
    """Bad calls, some bad on one rank only: each rank records what it raised."""
    def t(*shape, dtype=F32):
        return torch.randn(*shape, device=device, dtype=dtype)
    mine = 16 if rank == 0 else 24
    odd = t(1, 2, 15, 8)
    return {
        "unequal shards": _error(lambda: ring_attention(t(1, 2, mine, 8), t(1, 2, mine, 8), t(1, 2, mine, 8),
                                                        group=group)),
        "layout mismatch": _error(lambda: ring_attention(*[t(1, 2, 16, 8)] * 3, group=group,
                                                         layout="bhsd" if rank == 0 else "bshd")),
        "odd zigzag shards": _error(lambda: ring_attention(odd, odd, odd, zigzag=True, group=group)),
        "bad dtype on the last rank": _error(lambda: ring_attention(
            t(1, 2, 16, 8, dtype=torch.float64 if rank == world - 1 else F32), t(1, 2, 16, 8), t(1, 2, 16, 8),
            group=group)),
        "ulysses heads": _error(lambda: ulysses_attention(*[t(1, 3, 16, 8)] * 3, group=group)),
        "ulysses kv heads": _error(lambda: ulysses_attention(t(1, 6 * world, 16, 8), t(1, 3, 16, 8),
                                                             t(1, 3, 16, 8), group=group)),
        "unshard shapes": _error(lambda: unshard_sequence(t(1, 2, mine, 8), 2, group=group)),
        "shard length": _error(lambda: shard_sequence(t(1, 2, 4 * world + 2, 8), 2, group=group)),
    }


def _sharding(group, rank, world, device):
    """unshard(shard(x)) == x both ways, and unshard's gradient (every rank's loss uses the whole sequence)."""
    x = torch.randn(2, 8 * world, 3, generator=torch.Generator().manual_seed(1)).to(device)
    ok = [torch.equal(unshard_sequence(shard_sequence(x, 1, group, z), 1, group, z), x) for z in (False, True)]
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(device)
    s = shard_sequence(x, -2, group).detach().requires_grad_()
    (unshard_sequence(s, -2, group) * w).sum().backward()
    ok.append(torch.allclose(s.grad, world * shard_sequence(w, 1, group)))
    return ok


def _worker(rank, world, port, backend, out_dir):
    device = "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # a hang fails the test instead of stalling
    try:
        group = dist.new_group(list(range(world)))  # a group of its own: the group= paths, not only WORLD
        saved = {"cases": {}}
        for cp in CASES:
            if cp.world == world:
                saved["cases"][cp.id] = _run_case(cp, group, rank, device)
                if cp.twice:
                    again = _run_case(cp, group, rank, device)
                    saved["deterministic"] = all(torch.equal(saved["cases"][cp.id][n], again[n])
                                                 for n in ("out", "lse", "dq", "dk", "dv"))
        saved["errors"] = _errors(group, rank, world, device)
        saved["sharding"] = _sharding(group, rank, world, device)
        torch.save(saved, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


BACKENDS = [
    pytest.param("gloo", id="gloo"),
    pytest.param("nccl", id="nccl", marks=pytest.mark.skipif(
        torch.cuda.device_count() < 4 or not dist.is_nccl_available(), reason="NCCL tests need 4 CUDA GPUs")),
]


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(scope="module")
def runs(backend, tmp_path_factory, free_port):
    """world size -> every rank's saved results (one spawned group per world size)."""
    found = {}
    for world in (2, 4):
        out_dir = tmp_path_factory.mktemp(f"{backend}{world}")
        mp.start_processes(_worker, args=(world, free_port(), backend, str(out_dir)), nprocs=world, join=True,
                           start_method="spawn")
        found[world] = [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]
    return found


@pytest.mark.parametrize("cp", [pytest.param(cp, id=cp.id) for cp in CASES])
def test_equals_attention_on_the_whole_sequence(runs, cp):
    case, dim = cp.case, _seq_dim(cp.case)
    ranks = [saved["cases"][cp.id] for saved in runs[cp.world]]
    got = {n: assemble([r[n] for r in ranks], 2 if n == "lse" else dim, cp.zigzag)
           for n in ("out", "lse", "dq", "dk", "dv")}
    q, k, v, do = make_inputs(case, "cpu", seed=cp.seed)
    res = _measure(case, got, q, k, v, do, grad=True, mods=_modifiers(case, "cpu"))
    assert res.ok, res.describe()
    # the kernels ran, on every rank
    assert all(r["launches"]["fwd"] > 0 and r["launches"]["bwd"] > 0 for r in ranks)


def test_windows_skip_steps_no_launch_no_transfer(runs):
    """Causal window 8 on 4 shards of 32: rank r needs only its own keys and rank r - 1's, so each rank launches
    one forward (rank 0) or two, and the ring stops after one step: one K/V exchange per rank forward and
    backward, not three, plus the backward's dK/dV: one along the ring, one home."""
    cp = next(cp for cp in CASES if cp.world == 4 and cp.case.window == (8, 0))
    ranks = [saved["cases"][cp.id] for saved in runs[4]]
    assert [r["launches"] for r in ranks] == [dict(fwd=1, bwd=1)] + [dict(fwd=2, bwd=2)] * 3
    assert all(r["exchanges"] == {"kv": 2, "dkv": 1, "dkv home": 1} for r in ranks)
    full = next(cp for cp in CASES if cp.world == 4 and cp.scheme == "ring" and cp.case.mask == "none")
    assert all(saved["cases"][full.id]["exchanges"] == {"kv": 6, "dkv": 3, "dkv home": 1} for saved in runs[4])


def test_zigzag_balances_causal_work(runs):
    """Causal zigzag: every rank makes one forward call per step (contiguous shards: rank r makes r + 1)."""
    cp = next(cp for cp in CASES if cp.world == 4 and cp.zigzag and cp.case.causal)
    launches = [saved["cases"][cp.id]["launches"]["fwd"] for saved in runs[4]]
    assert launches == [4] * 4


@pytest.mark.parametrize("world", [2, 4])
def test_deterministic(runs, world):
    assert all(saved["deterministic"] for saved in runs[world])


ERRORS = {
    "unequal shards": ("ValueError", "ring_attention needs the same shard length on every rank, got rank 0: 16, "
                                     "rank 1: 24"),
    "layout mismatch": ("ValueError", "ring_attention needs the same layout on every rank, got rank 0: bhsd, "
                                      "rank 1: bshd"),
    "odd zigzag shards": ("ValueError", "ring_attention: rank 0: zigzag shards hold two equal chunks, got shards "
                                        "of odd length 15"),
    "bad dtype on the last rank": ("TypeError", "ring_attention: rank {last}: q has unsupported dtype torch.float64"),
    "ulysses heads": ("ValueError", "ulysses_attention: rank 0: Ulysses needs the query heads divisible by the "
                                    "world size, got Hq = 3 on {world} ranks"),
    "ulysses kv heads": ("ValueError", "ulysses_attention: rank 0: Ulysses needs the kv heads divisible by the "
                                       "world size or dividing it, got Hkv = 3 on {world} ranks"),
    "unshard shapes": ("ValueError", "unshard_sequence needs the same shape on every rank, got rank 0: (1, 2, 16, 8), "
                                     "rank 1: (1, 2, 24, 8)"),
    "shard length": ("ValueError", "cannot be cut into {parts} equal zigzag chunks for {world} ranks"),
}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("what", list(ERRORS))
def test_errors_raise_on_every_rank(runs, world, what):
    kind, message = ERRORS[what]
    message = message.format(last=world - 1, world=world, parts=2 * world)
    for rank, saved in enumerate(runs[world]):
        got = saved["errors"][what]
        assert got is not None and got[0] == kind and message in got[1], (rank, got)


@pytest.mark.parametrize("world", [2, 4])
def test_shard_and_unshard_are_inverse(runs, world):
    assert all(all(saved["sharding"]) for saved in runs[world])


def test_schedule_without_a_group():
    """The step plans alone (no processes). Zigzag causal, W = 2, chunks of 16: rank 0 holds chunks 0 and 3,
    rank 1 chunks 1 and 2."""
    from fused_attn.distributed.ring import Call, schedule
    plan, last = schedule(0, 2, 32, True, -1, 0)
    assert last == 1
    assert plan[0] == (Call(0, 32, 0, 32, 0, -1, 0),)  # local causal is the global mask on zigzag shards
    assert plan[1] == (Call(16, 32, 0, 32, 0, -1, -1),)  # rank 0's late chunk sees both of rank 1's, unmasked
    plan, last = schedule(1, 2, 32, True, -1, 0)
    assert plan[1] == (Call(0, 32, 0, 16, 0, -1, -1),)  # both of rank 1's chunks see rank 0's early chunk
    # ALiBi needs each block's own diagonal offset. Rank 1's chunks 1 and 2 are adjacent: still one call.
    assert schedule(1, 2, 32, True, -1, 0, True)[0][1] == (Call(0, 32, 0, 16, 16, -1, -1),)
    # Without a mask rank 0 (chunks 0 and 3) sees all of rank 1 in one call, but with ALiBi its two chunks are
    # 48 positions apart, so one call per chunk: offsets 0 - 16 and 48 - 16.
    assert schedule(0, 2, 32, True, -1, -1)[0][1] == (Call(0, 32, 0, 32, 0, -1, -1),)
    assert schedule(0, 2, 32, True, -1, -1, True)[0][1] == (Call(0, 16, 0, 32, -16, -1, -1),
                                                           Call(16, 32, 0, 32, 32, -1, -1))
    assert schedule(0, 4, 32, False, 8, 0) == (((Call(0, 32, 0, 32, 0, 8, 0),), ()), 1)  # rank 3's keys: unseen
    assert schedule(1, 4, 32, False, 8, 0)[0][1] == (Call(0, 32, 0, 32, 32, 8, 0),)  # rank 0's last 8 keys


def test_example_training_step_under_torchrun(tmp_path, free_port):
    """README's torchrun command, on the CPU: 4 processes as 2 replicas x 2-way context parallelism; the step's
    parameter gradients equal the step on the whole sequence."""
    import re
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-port",
           str(free_port()), "-m", "fused_attn.distributed.example", "--cp", "2", "--check"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    found = re.findall(r"rank (\d): ring cp=2 max \|grad - grad on the whole sequence\| = (\S+) \(largest gradient "
                       r"(\S+)\)", done.stdout)
    assert sorted(int(r) for r, *_ in found) == [0, 1, 2, 3], done.stdout
    assert all(float(err) <= 1e-5 * float(scale) for _, err, scale in found), done.stdout


def test_band_classes_match_the_mask():
    """The planner's block classes against the mask drawn cell by cell."""
    from fused_attn.distributed.ring import EMPTY, FULL, PARTIAL, _band
    for m, n in ((1, 1), (3, 5), (6, 2), (4, 4)):
        for offset in range(-8, 9):
            for left in (-1, 0, 1, 3):
                for right in (-1, 0, 2):
                    i, j = torch.arange(m)[:, None], torch.arange(n)[None, :]
                    seen = torch.ones(m, n, dtype=torch.bool)
                    if left >= 0:
                        seen &= j >= i + offset - left
                    if right >= 0:
                        seen &= j <= i + offset + right
                    want = FULL if seen.all() else PARTIAL if seen.any() else EMPTY
                    assert _band(m, n, offset, left, right) == want, (m, n, offset, left, right)
