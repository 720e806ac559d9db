"""The kernel paths beside the default: TMA tensor-descriptor loads and the longest-first tile order, through the
interpreter (or compiled on a GPU of compute capability 9.0+), against the float64 reference; the choice rules."""
import pytest
import torch

from fused_attn import kernels
from fused_attn.kernels import configs, forward
from fused_attn.testing import Case, evaluate

ON_GPU = torch.cuda.is_available()
TMA_HERE = not ON_GPU or torch.cuda.get_device_capability()[0] >= 9

CASES = [
    pytest.param(Case(1, 4, 2, 113, 203, 64, causal=True), id="gqa-causal-q113-k203-d64"),
    pytest.param(Case(1, 2, 1, 97, 64, 80, 40, window=(10, 3), layout="bshd"), id="mqa-win10-3-d80-dv40-bshd"),
    pytest.param(Case(2, 2, 2, 77, 60, 64, window=(5, -1)), id="mha-left5-q77-k60"),
    pytest.param(Case(1, 2, 2, 40, 17, 40, causal=True), id="mha-causal-q40-k17-d40-empty-rows"),
]


@pytest.mark.skipif(not TMA_HERE, reason="TMA needs compute capability 9.0+")
@pytest.mark.parametrize("longest_first", [False, True], ids=["natural", "longest-first"])
@pytest.mark.parametrize("case", CASES)
def test_tma_path(case, longest_first, device):
    with configs.use(tma=True, longest_first=longest_first):
        res = evaluate(case, device)
    assert res.launches.get("fwd:tma") == 1 and res.launches.get("bwd:tma") == 1, res.launches
    assert res.ok, res.describe()


@pytest.mark.parametrize("case", CASES[:1] + CASES[2:3])
def test_longest_first_pointer_path(case, device):
    with configs.use(longest_first=True):
        res = evaluate(case, device)
    assert res.launches.get("fwd:ptr") == 1 and res.launches.get("bwd:ptr") == 1, res.launches
    assert res.ok, res.describe()


@pytest.mark.skipif(not TMA_HERE, reason="TMA needs compute capability 9.0+")
def test_unaligned_inputs_take_the_pointer_path(device):
    """D = 111 in fp16 gives 222-byte rows, not 16-byte aligned: TMA cannot describe them."""
    with configs.use(tma=True):
        res = evaluate(Case(1, 2, 1, 33, 47, 111, 40, causal=True), device)
    assert res.launches.get("fwd:ptr") == 1 and res.launches.get("fwd:tma", 0) == 0, res.launches
    assert res.ok, res.describe()


def test_tile_order_rule():
    """Reversed where the last query tiles see the most keys: only the right side bounded (causal)."""
    assert forward.reverse_tiles(-1, 0) and forward.reverse_tiles(-1, 5)
    assert not forward.reverse_tiles(-1, -1) and not forward.reverse_tiles(7, 0) and not forward.reverse_tiles(7, -1)
    q = torch.empty(1, 2, 300, 64, device="meta", dtype=torch.float16)
    stats = torch.empty(1, 2, 300, 2, device="meta")
    cfg = configs.KernelConfig(64, 64, 4, 2, longest_first=True)
    fwd = forward.forward_launches(q, q, q, q, stats[..., 0], stats, 0.1, 0, -1, 0, cfg)
    bwd = kernels.backward.backward_launches(q, q, q, q, q, stats, q, q, q, stats[..., 0], 0.1, 0, -1, 0,
                                             (cfg, cfg))
    reverse = {k.fn.__name__: kw["C"].REVERSE for k, _, _, kw in fwd + bwd if "C" in kw}
    # causal: query tiles reversed (last sees most), key tiles in natural order (first is seen by most queries)
    assert reverse == {"_attn_fwd_kernel": True, "_attn_bwd_dkdv_kernel": False, "_attn_bwd_dq_kernel": True}


def test_use_overrides_and_restores():
    default = configs.forward_config(64, 64, torch.float16, None)
    assert not default.tma and not default.longest_first
    with configs.use(tma=True):
        with configs.use(longest_first=True):
            c = configs.forward_config(64, 64, torch.float16, None)
            assert c.tma and c.longest_first
        assert configs.backward_config(64, 64, torch.float16, None)[0].tma
    assert configs.forward_config(64, 64, torch.float16, None) == default
    with pytest.raises(ValueError, match="TMA load path needs compute capability 9.0"), configs.use(tma=True):
        configs.forward_config(64, 64, torch.float16, (8, 0))
    with pytest.raises(TypeError, match="tma must be True, False or None"), configs.use(tma="yes"):
        pass


def test_interpreter_version_check(monkeypatch):
    """Triton < 3.7's interpreter with NumPy >= 2.4 fails inside every kernel: say so before launching."""
    import fused_attn._args as args
    class V:
        def __init__(self, v):
            self.__version__ = v
    monkeypatch.setattr(args, "triton", V("3.6.0"))
    monkeypatch.setattr(args, "numpy", V("2.4.1"))
    with pytest.raises(RuntimeError, match=r"install 'numpy<2.4' or 'triton>=3.7'"):
        args._check_interpreter()
    monkeypatch.setattr(args, "numpy", V("2.3.5"))
    args._check_interpreter()
    monkeypatch.setattr(args, "triton", V("3.7.0"))
    monkeypatch.setattr(args, "numpy", V("2.4.1"))
    args._check_interpreter()


def test_split_dkdv_is_bitwise_the_one_pass_backward(device):
    """Large head dims run dV and dK as two launches of the dK/dV kernel: the same arithmetic per accumulator."""
    from fused_attn.testing import make_inputs
    case = Case(1, 4, 2, 70, 90, 40, 24, causal=True)
    q, k, v, do = (t.detach() for t in make_inputs(case, device))
    B, Hq, Sq, _ = q.shape
    out = torch.empty(B, Hq, Sq, v.shape[3], device=device, dtype=q.dtype)
    lse = torch.empty(B, Hq, Sq, device=device)
    stats = torch.empty(B, Hq, Sq, 2, device=device)
    kernels.attention_forward(q, k, v, out, lse, stats, 0.2, 20, -1, 0)
    grads = []
    for split in (False, True):
        cfg = configs.KernelConfig(32, 32, 4, 1, split_dkdv=split)
        grad_bufs = [torch.empty_like(t) for t in (q, k, v)]
        launches = kernels.backward.backward_launches(do, q, k, v, out, stats, *grad_bufs, torch.empty_like(lse),
                                                      0.2, 20, -1, 0, (cfg, cfg))
        assert sum(kernel.fn.__name__ == "_attn_bwd_dkdv_kernel" for kernel, *_ in launches) == 1 + split
        g = [torch.full_like(t, float("nan")) for t in (q, k, v)]
        kernels.attention_backward(do, q, k, v, out, stats, *g, torch.empty_like(lse), 0.2, 20, -1, 0, config=cfg)
        grads.append(g)
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_an_unknown_gpu_gets_the_conservative_tables_and_one_log_line(caplog):
    with caplog.at_level("WARNING", logger="fused_attn"):
        cfg = configs.forward_config(128, 128, torch.bfloat16, (13, 0))
        again = configs.forward_config(64, 64, torch.bfloat16, (13, 0))
    assert (cfg.block_m, cfg.block_n) == configs.SMALL["fwd"][128][:2]
    assert (again.block_m, again.block_n) == configs.SMALL["fwd"][64][:2]
    assert [r.getMessage() for r in caplog.records].count(
        "fused_attn: compute capability 13.0 has no tuned tables; using the 99 KB GPUs' (the most conservative)") == 1


PERSISTENT_CASES = [
    pytest.param(Case(2, 4, 2, 100, 130, 64, causal=True), None, id="gqa-causal-q100-k130"),
    pytest.param(Case(1, 3, 3, 70, 70, 40, 24, window=(20, 5), layout="bshd"), None, id="mha-win20-5-d40-dv24"),
    pytest.param(Case(1, 2, 1, 33, 97, 64, causal=True), "modifiers", id="mqa-causal-softcap-alibi-dropout-sinks"),
]


@pytest.mark.parametrize("case,modifiers", PERSISTENT_CASES)
def test_persistent_is_bitwise_the_tiled_grid(case, modifiers, device):
    """A persistent launch (a few programs walking every tile, heaviest first) computes each tile exactly as the
    one-tile grid does: out, lse and all gradients bitwise equal. The buffers start as NaN, so a tile the walk
    missed would show."""
    from fused_attn.kernels.launch import Modifiers, launches
    from fused_attn.testing import make_inputs
    q, k, v, do = (t.detach() for t in make_inputs(case, device))
    q, k, v, do = (t.transpose(1, 2) if case.layout == "bshd" else t for t in (q, k, v, do))
    B, Hq, Sq, _ = q.shape
    left, right = (-1, 0) if case.causal else case.window
    offset = k.shape[2] - Sq
    mods = None
    if modifiers:
        mods = Modifiers(softcap=5.0, alibi_slopes=torch.rand(Hq, device=device), dropout_p=0.2,
                         rng=torch.tensor([7, 3], device=device), sinks=torch.randn(Hq, device=device))
    results = []
    for persistent in (False, True):
        cfg = configs.KernelConfig(32, 32, 4, 1, persistent=persistent)
        before = launches["fwd:persistent"], launches["bwd:persistent"]
        out = torch.full((B, Hq, Sq, v.shape[3]), float("nan"), device=device, dtype=q.dtype)
        lse, stats = (torch.full(s, float("nan"), device=device) for s in ((B, Hq, Sq), (B, Hq, Sq, 2)))
        kernels.attention_forward(q, k, v, out, lse, stats, 0.3, offset, left, right, cfg, mods=mods)
        grads = [torch.full_like(t, float("nan")) for t in (q, k, v)]
        kernels.attention_backward(do, q, k, v, out, stats, *grads, torch.empty_like(lse), 0.3, offset, left, right,
                                   config=cfg, mods=mods)
        assert (launches["fwd:persistent"] - before[0], launches["bwd:persistent"] - before[1]) == (persistent,) * 2
        results.append((out, lse, *grads))
    assert not results[0][0].isnan().any() and not results[0][2].isnan().any()
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_persistent_grid_and_fallbacks(device):
    """A persistent launch has one program per SM (3 under the interpreter), never more than the tiles; packed
    sequences keep the one-tile grid; `use(persistent=True)` reaches the default configs, forward and backward
    (but sm_100's backward above D = 128)."""
    from fused_attn.kernels import launch
    q = torch.empty(2, 4, 300, 64, device="meta", dtype=torch.float16)
    stats = torch.empty(2, 4, 300, 2, device="meta")
    for persistent, grid in ((False, (10, 8)), (True, (launch.DEFAULT_PROGRAMS if ON_GPU else 3, 1))):
        cfg = configs.KernelConfig(32, 32, 4, 1, persistent=persistent)
        (kernel, g, _, kw), = forward.forward_launches(q, q, q, q, stats[..., 0], stats, 0.1, 0, -1, 0, cfg)
        assert kw["C"].PERSISTENT is persistent and kw["C"].REVERSE is persistent and g == grid
    tiny = torch.empty(1, 1, 20, 64, device="meta", dtype=torch.float16)
    cfg = configs.KernelConfig(32, 32, 4, 1, persistent=True)
    (_, g, _, _), = forward.forward_launches(tiny, tiny, tiny, tiny, stats[:1, :1, :20, 0], stats, 0.1, 0, -1, 0, cfg)
    assert g == (1, 1)  # one tile: one program
    with configs.use(persistent=True):
        assert configs.forward_config(64, 64, torch.float16, None).persistent
        assert all(c.persistent for c in configs.backward_config(64, 64, torch.float16, None))
        assert not configs.forward_config(64, 64, torch.float16, None, packed=True).persistent
        # sm_100 above D = 128: the backward kernels keep one program per tile (persistent, they spill)
        assert configs.forward_config(256, 256, torch.bfloat16, (10, 0)).persistent
        assert not any(c.persistent for c in configs.backward_config(256, 256, torch.bfloat16, (10, 0)))
        assert all(c.persistent for c in configs.backward_config(128, 128, torch.bfloat16, (10, 0)))
        assert all(c.persistent for c in configs.backward_config(256, 256, torch.bfloat16, (9, 0)))
    with pytest.raises(TypeError, match="persistent must be True, False or None"), configs.use(persistent=1):
        pass


WS_CASES = [
    pytest.param(Case(2, 4, 2, 100, 130, 64, causal=True), id="gqa-causal-q100-k130"),
    pytest.param(Case(1, 3, 3, 70, 70, 40, 24, window=(20, 5), layout="bshd"), id="mha-win20-5-d40-dv24"),
    pytest.param(Case(1, 2, 1, 40, 17, 64, causal=True), id="mqa-causal-q40-k17-empty-rows"),
]


@pytest.mark.skipif(not TMA_HERE, reason="warp specialization needs compute capability 9.0+")
@pytest.mark.parametrize("persistent", [False, True], ids=["tiled", "persistent"])
@pytest.mark.parametrize("case", WS_CASES)
def test_warp_specialized_kernels_are_bitwise_the_default(case, persistent, device):
    """The warp-specialized kernels run one key (query) loop with every tile masked over descriptors made in the
    kernel; the mask is the identity on full tiles, so out, lse and every gradient are bitwise the default
    kernels'."""
    from fused_attn.kernels.launch import launches
    from fused_attn.testing import make_inputs
    q, k, v, do = (t.detach() for t in make_inputs(case, device))
    q, k, v, do = (t.transpose(1, 2) if case.layout == "bshd" else t for t in (q, k, v, do))
    B, Hq, Sq, _ = q.shape
    left, right = (-1, 0) if case.causal else case.window
    offset = k.shape[2] - Sq
    results = []
    for ws in (False, True):
        cfg = configs.KernelConfig(32, 32, 4, 1, warp_specialize=ws, persistent=persistent and ws)
        before = launches["fwd:warp_spec"], launches["bwd:warp_spec"]
        out = torch.full((B, Hq, Sq, v.shape[3]), float("nan"), device=device, dtype=q.dtype)
        lse, stats = (torch.full(s, float("nan"), device=device) for s in ((B, Hq, Sq), (B, Hq, Sq, 2)))
        kernels.attention_forward(q, k, v, out, lse, stats, 0.3, offset, left, right, cfg)
        grads = [torch.full_like(t, float("nan")) for t in (q, k, v)]
        kernels.attention_backward(do, q, k, v, out, stats, *grads, torch.empty_like(lse), 0.3, offset, left, right,
                                   config=cfg)
        assert (launches["fwd:warp_spec"] - before[0], launches["bwd:warp_spec"] - before[1]) == (ws, ws)
        results.append((out, lse, stats, *grads))
    assert not results[0][0].isnan().any() and not results[0][3].isnan().any()
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_warp_specialization_rules():
    """Forward, dQ and dK/dV (dK/dV, and a persistent dQ, up to D = 128: their configs drop it above), dense calls
    only, sm_90+; their loads go through descriptors the kernel makes (TMA == 2: the sources stay tensors);
    unaligned inputs fall back to pointers."""
    from fused_attn.kernels import launch
    with configs.use(warp_specialize=True):
        assert configs.forward_config(64, 64, torch.float16, None).warp_specialize
        assert all(c.warp_specialize for c in configs.backward_config(128, 128, torch.float16, None))
        dkdv, dq = configs.backward_config(256, 256, torch.float16, None)
        assert dq.warp_specialize and not dkdv.warp_specialize
        with configs.use(persistent=True):  # a persistent dQ above D = 128 drops it too (it spills)
            dkdv, dq = configs.backward_config(256, 256, torch.float16, (9, 0))
            assert dq.persistent and not dq.warp_specialize and not dkdv.warp_specialize
            assert all(c.warp_specialize for c in configs.backward_config(128, 128, torch.float16, (9, 0)))
        assert not configs.forward_config(64, 64, torch.float16, None, packed=True).warp_specialize
        with pytest.raises(ValueError, match="warp specialization needs compute capability 9.0"):
            configs.forward_config(64, 64, torch.float16, (8, 0))
        assert configs.forward_config(128, 128, torch.bfloat16, (9, 0)) == configs.KernelConfig(
            128, 128, 4, 2, warp_specialize=True)
    cfg = configs.KernelConfig(32, 32, 4, 1, warp_specialize=True)
    q = torch.empty(1, 2, 64, 64, device="meta", dtype=torch.float16)
    src, tile, _ = launch.tile_args(cfg, False, q, q, q)
    assert tile.TMA == 2 and tile.WARP_SPEC and all(s is q for s in src)
    odd = torch.empty(1, 2, 64, 111, device="meta", dtype=torch.float16)
    src, tile, _ = launch.tile_args(cfg, False, odd, odd, odd)
    assert tile.TMA is False and not tile.WARP_SPEC
    src, tile, _ = launch.tile_args(cfg, False, q, q, q, do=q)  # a backward kernel
    assert tile.TMA == 2 and tile.WARP_SPEC and all(s is q for s in src)
