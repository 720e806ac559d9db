"""The host path of the per-layer calls: no device-to-host sync (CUDA graphs capture decode steps), traced whole
by torch.compile(fullgraph=True), the same bits through the custom ops (torch.compile's path) as through the direct
eager path, and `python -m bench --host` measuring every entry point. On a GPU: a decode step captured in a CUDA
graph and replayed with new cache contents and lengths."""
import gc
import weakref

import pytest
import torch
import triton
import triton.language as tl

import fused_attn
from bench import host
from fused_attn._args import without_value_checks
from fused_attn.kernels.launch import stubbed_launches
from fused_attn.testing import Syncs, make_kvcache_inputs, make_serving_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PER_LAYER = ["serving (64 decodes, paged)", "kvcache decode", "kvcache decode + append", "flash_attn_varlen_func",
             "flash_attn_with_kvcache", "flash_attn_func", "sdpa drop-in", "flex (prebuilt BlockMask)",
             "attention fwd", "attention_varlen", "serving + metadata", "kvcache decode + metadata",
             "flash_attn_varlen_func + metadata", "flash_attn_with_kvcache + metadata"]


@pytest.fixture(scope="module")
def entries():
    return host._entries(torch.device(DEVICE))


def test_per_layer_calls_make_no_host_sync(entries):
    """With the CPU-only value checks off (as a GPU tensor skips them) and the launches stubbed, not one op of a
    per-layer call reads a value on the host -- each call twice: with a plan, the second is its replay."""
    with stubbed_launches(), without_value_checks():
        for name in PER_LAYER:
            with Syncs() as syncs:
                entries[name]()
                entries[name]()
            assert syncs.seen == [], (name, syncs.seen)


def test_the_sync_counter_sees_a_sync():
    """The counter is not blind: the CPU-only value checks it is run without do read values."""
    q, kc, vc, cu, used, table = make_serving_inputs([3, 1], [40, 17], 2, 2, 16, torch.float32, "cpu", 16)
    with stubbed_launches(), Syncs() as syncs:
        fused_attn.attention_varlen(q, kc, vc, cu, None, 3, 40, seqused_k=used, block_table=table)
    assert syncs.seen


def test_fullgraph_traces_every_per_layer_call(entries):
    with stubbed_launches():
        for name in PER_LAYER:
            torch._dynamo.reset()
            torch.compile(entries[name], fullgraph=True, backend="aot_eager")()


def test_decode_and_serving_compiled_equal_eager():
    """The custom ops (torch.compile's path) and the direct eager launch give the same bits."""
    q, kc, vc, table, k, v = make_kvcache_inputs(2, 1, 4, 2, 16, 100, 1, torch.float32, DEVICE, page=16, seed=3)
    lens = torch.tensor([60, 99], dtype=torch.int32, device=DEVICE)
    sq, skc, svc, cu, used, stable = make_serving_inputs([5, 1, 1], [70, 33, 9], 4, 2, 16, torch.float32, DEVICE, 16)

    def step(kc, vc):
        a = fused_attn.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, block_table=table, causal=True)
        b = fused_attn.attention_varlen(sq, skc, svc, cu, None, 5, 70, seqused_k=used, block_table=stable,
                                        causal=True)
        return a, b
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    kc2, vc2 = kc.clone(), vc.clone()
    for x, y in zip(step(kc, vc), compiled(kc2, vc2)):
        assert torch.equal(x, y)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)  # the append too


def test_bench_host_measures_every_entry_point(monkeypatch):
    rows = host.measure(calls=3)
    assert [r["entry"] for r in rows][0].startswith("torch sdpa") and len(rows) == 16
    assert all(r["us"] > 0 and r["ratio"] > 0 for r in rows)
    assert all(r["launches"] >= 1 and r["max_args"] > 0 for r in rows[1:])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_decode_step_replays_in_a_cuda_graph():
    """A decode step (append + attention over a paged cache) captured once, replayed with new cache contents and
    lengths, equals the eager call on the same state."""
    q, kc, vc, table, k, v = make_kvcache_inputs(4, 1, 8, 2, 64, 512, 1, torch.bfloat16, "cuda", page=16, seed=4)
    lens = torch.tensor([100, 3, 400, 250], dtype=torch.int32, device="cuda")
    fused_attn.attention_with_kvcache(q, kc.clone(), vc.clone(), k, v, cache_seqlens=lens, block_table=table)
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        out = fused_attn.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, block_table=table)
    torch.cuda.current_stream().wait_stream(stream)
    for step in range(3):
        g = torch.Generator(device="cuda").manual_seed(step)
        for t in (q, kc, vc, k, v):
            t.copy_(torch.randn(t.shape, generator=g, device="cuda"))
        lens.copy_(torch.randint(0, 500, (4,), generator=g, device="cuda", dtype=torch.int32))
        kc_e, vc_e = kc.clone(), vc.clone()
        graph.replay()
        want = fused_attn.attention_with_kvcache(q, kc_e, vc_e, k, v, cache_seqlens=lens, block_table=table)
        assert torch.equal(out, want) and torch.equal(kc, kc_e)
    # A layer's call with the step's plan: recorded eagerly, its replay captured.
    meta = fused_attn.get_scheduler_metadata(4, 1, 512, 8, 2, 64, lens, qkv_dtype=torch.bfloat16, page_size=16)
    fused_attn.attention_with_kvcache(q, kc, vc, cache_seqlens=lens, block_table=table, scheduler_metadata=meta)
    graph = torch.cuda.CUDAGraph()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        out = fused_attn.attention_with_kvcache(q, kc, vc, cache_seqlens=lens, block_table=table,
                                                scheduler_metadata=meta)
    torch.cuda.current_stream().wait_stream(stream)
    for step in range(2):
        lens.copy_(torch.randint(0, 500, (4,), device="cuda", dtype=torch.int32))
        q.copy_(torch.randn_like(q))
        graph.replay()
        assert torch.equal(out, fused_attn.attention_with_kvcache(q, kc, vc, cache_seqlens=lens, block_table=table,
                                                                  scheduler_metadata=meta))


def test_scheduler_metadata_made_once_serves_every_layer():
    """One plan per step (get_scheduler_metadata), passed to two layers' calls: each equals the call without a
    plan bit for bit, splits included (one long sequence: its keys split, the scratch shared by the layers)."""
    q, kc, vc, cu, used, table = make_serving_inputs([1, 3], [300, 40], 4, 2, 16, torch.float32, DEVICE, 16, seed=5)
    meta = fused_attn.get_scheduler_metadata(2, 3, 300, 4, 2, 16, used, qkv_dtype=torch.float32, cu_seqlens_q=cu,
                                             page_size=16)
    assert meta.plan.splits > 1 and meta.plan.scratch[0] is not None
    for layer in range(2):
        kl, vl = kc + layer, vc - layer
        want = fused_attn.attention_varlen(q, kl, vl, cu, None, 3, 300, seqused_k=used, block_table=table,
                                           causal=True)
        got = fused_attn.flash_attn_varlen_func(q, kl, vl, cu, None, 3, 300, seqused_k=used, block_table=table,
                                                causal=True, scheduler_metadata=meta)
        assert torch.equal(got, want)
    qd, kcd, vcd, tabled, kn, vn = make_kvcache_inputs(2, 1, 4, 2, 16, 320, 1, torch.float32, DEVICE, page=16)
    lens = torch.tensor([300, 12], dtype=torch.int32, device=DEVICE)
    step = fused_attn.get_scheduler_metadata(2, 1, 301, 4, 2, 16, lens + 1, qkv_dtype=torch.float32, page_size=16)
    kc2, vc2 = kcd.clone(), vcd.clone()
    want = fused_attn.attention_with_kvcache(qd, kcd, vcd, kn, vn, cache_seqlens=lens, block_table=tabled)
    got = fused_attn.flash_attn_with_kvcache(qd, kc2, vc2, kn, vn, cache_seqlens=lens, block_table=tabled,
                                             scheduler_metadata=step)
    assert torch.equal(got, want) and torch.equal(kc2, kcd)


def test_scheduler_metadata_errors_name_the_value():
    q, kc, vc, cu, used, table = make_serving_inputs([1, 3], [30, 40], 4, 2, 16, torch.float32, DEVICE, 16)
    meta = fused_attn.get_scheduler_metadata(2, 3, 40, 4, 2, 16, used, qkv_dtype=torch.float32, cu_seqlens_q=cu,
                                             page_size=16)
    with pytest.raises(ValueError, match=r"num_heads_q 2 \(the plan's: 4\)"):
        fused_attn.attention_varlen(q[:, :2], kc, vc, cu, None, 3, 40, seqused_k=used, block_table=table,
                                    scheduler_metadata=meta)
    with pytest.raises(ValueError, match="page_size 0"):
        fused_attn.attention_with_kvcache(q[:2, None], kc[:2], vc[:2], scheduler_metadata=meta)
    for kw, err, match in [(dict(pack_gqa=False), ValueError, "pack_gqa=False"),
                           (dict(qkv_dtype=torch.float64), TypeError, "qkv_dtype"),
                           (dict(page_size=8), ValueError, "page_size must be a multiple of 16")]:
        with pytest.raises(err, match=match):
            fused_attn.get_scheduler_metadata(2, 3, 40, 4, 2, 16, used, **kw)
    if DEVICE == "cpu":  # values are read where they are on the CPU
        with pytest.raises(ValueError, match=r"cache_seqlens must lie in \[0, max_seqlen_k = 35\]"):
            fused_attn.get_scheduler_metadata(2, 3, 35, 4, 2, 16, used)


def test_plan_replays_its_first_call_on_new_tensors(monkeypatch):
    """A plan records a per-layer call's launches once (SchedulerMetadata.replays) and makes them again on the next
    calls' tensors -- new queries, cache contents, lengths, sinks: the same bits as a call checked and planned anew.
    A call of another layout is a new key: checked, and refused where it does not match the plan."""
    checked = []
    for module, name in ((fused_attn.varlen, "_serving"), (fused_attn.decode, "_with_kvcache")):
        fn = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, fn=fn, name=name: checked.append(name) or fn(*a))
    q, kc, vc, cu, used, table = make_serving_inputs([1, 3, 2], [300, 40, 77], 4, 2, 16, torch.float32, DEVICE, 16,
                                                     seed=6)
    plan = (lambda: fused_attn.get_scheduler_metadata(3, 3, 300, 4, 2, 16, used, qkv_dtype=torch.float32,
                                                      cu_seqlens_q=cu, page_size=16))
    meta = plan()
    qd, kcd, vcd, tabled, _, _ = make_kvcache_inputs(2, 1, 4, 2, 16, 320, 1, torch.float32, DEVICE, page=16)
    lens = torch.tensor([300, 12], dtype=torch.int32, device=DEVICE)
    step_plan = (lambda: fused_attn.get_scheduler_metadata(2, 1, 320, 4, 2, 16, lens, qkv_dtype=torch.float32,
                                                           page_size=16))
    step = step_plan()
    for layer in range(3):
        g = torch.Generator(device="cpu").manual_seed(layer)
        new = (lambda t: torch.randn(t.shape, generator=g).to(DEVICE, t.dtype))
        sinks = new(torch.empty(4))
        kw = dict(seqused_k=(used - 7 * layer).clamp(min=0), block_table=table.flip(1), causal=True, sinks=sinks,
                  return_lse=True)
        args = (new(q), new(kc), new(vc), cu, None, 3, 300)
        for x, y in zip(fused_attn.attention_varlen(*args, **kw, scheduler_metadata=meta),
                        fused_attn.attention_varlen(*args, **kw, scheduler_metadata=plan())):
            assert torch.equal(x, y)
        args, kw = (new(qd), new(kcd), new(vcd)), dict(cache_seqlens=lens - layer, block_table=tabled, sinks=sinks,
                                                       window_size=(50, 0), return_lse=True)
        for x, y in zip(fused_attn.attention_with_kvcache(*args, **kw, scheduler_metadata=step),
                        fused_attn.attention_with_kvcache(*args, **kw, scheduler_metadata=step_plan())):
            assert torch.equal(x, y)
    assert len(meta.replays) == 1 and len(step.replays) == 1
    assert checked.count("_serving") == 1 + 3 and checked.count("_with_kvcache") == 1 + 3  # the plan's first + anew
    with pytest.raises(ValueError, match=r"num_heads_q 2 \(the plan's: 4\)"):
        fused_attn.attention_varlen(q[:, :2], kc, vc, cu, None, 3, 300, seqused_k=used, block_table=table,
                                    scheduler_metadata=meta)


REPLAYED = [  # (entry point, its keyword arguments, the inputs' shapes (q, k, v), extra tensors by keyword)
    pytest.param("attention", dict(causal=True), [(1, 4, 40, 16), (1, 2, 40, 16), (1, 2, 40, 16)], {}, id="causal"),
    pytest.param("attention", dict(window_size=(5, 3), layout="bshd", return_lse=True, softcap=2.0),
                 [(2, 33, 2, 16), (2, 47, 2, 16), (2, 47, 2, 8)], dict(alibi_slopes=(2,), sinks=(2,)),
                 id="bshd-window-lse-alibi-sinks"),
    pytest.param("attention", dict(causal=True, layout="bshd"), [(1, 3, 4, 16), (1, 700, 2, 16), (1, 700, 2, 16)],
                 {}, id="split-kv-decode"),
    pytest.param("flex", dict(enable_gqa=True, return_lse=True), [(1, 4, 64, 16), (1, 2, 64, 16), (1, 2, 64, 16)],
                 {}, id="flex-blockmask-scoremod"),
    pytest.param("sdpa", dict(is_causal=True, enable_gqa=True), [(2, 4, 24, 16), (2, 2, 40, 16), (2, 2, 40, 16)],
                 {}, id="sdpa-dropin"),
]


@fused_attn.ScoreMod
@triton.jit
def _shifted(score, b, h, q_idx, kv_idx, SHIFT):
    return score + tl.load(SHIFT + h)


@pytest.mark.parametrize("entry, kw, shapes, extra", REPLAYED)
def test_later_calls_replay_the_checked_launches(entry, kw, shapes, extra, monkeypatch):
    """attention / flex_attention / the SDPA drop-in remember a layout's launches from its second call on
    (fused_attn/replay.py): the next calls on new tensors give the bits (and strides) of a call checked anew, the
    checked path runs twice for four calls, and no tensor of a recorded call is kept alive."""
    checked = []
    for module, name in ((fused_attn.function, "kernel_args"), (fused_attn.flex, "kernel_args"),
                         (fused_attn.dropin, "kernel_args")):
        fn = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, fn=fn, **k: checked.append(1) or fn(*a, **k))
    mask = fused_attn.create_block_mask(lambda b, h, i, j: i >= j, 1, 1, 64, 64, device=DEVICE, BLOCK_SIZE=32)
    call = {"attention": fused_attn.attention, "sdpa": fused_attn.scaled_dot_product_attention,
            "flex": lambda *t, **k: fused_attn.flex_attention(*t, score_mod=_shifted, block_mask=mask, **k)}[entry]

    def inputs(seed):
        g = torch.Generator(device="cpu").manual_seed(seed)
        new = (lambda s: torch.randn(s, generator=g).to(DEVICE))
        more = {name: new(s).abs() for name, s in extra.items()}
        return [new(s) for s in shapes], (dict(mod_args=(new((4,)),)) if entry == "flex" else {}), more

    def results(fresh: bool):
        out, queries = [], []
        for seed in range(4):
            if fresh:
                fused_attn.replay.clear()
            tensors, flex_args, more = inputs(seed)
            r = call(*tensors, **kw, **flex_args, **more)
            out.append(r if isinstance(r, tuple) else (r,))
            queries.append(weakref.ref(tensors[0]))
        return out, queries

    expected, _ = results(fresh=True)
    fused_attn.replay.clear()
    checked.clear()
    got, queries = results(fresh=False)
    for x, y in zip(sum(got, ()), sum(expected, ())):
        assert torch.equal(x, y) and x.stride() == y.stride()
    assert len(checked) == 2 and len(fused_attn.replay.CALLS) == 1
    assert isinstance(next(iter(fused_attn.replay.CALLS.calls.values())), fused_attn.replay._Replay)
    gc.collect()
    assert queries[1]() is None  # the recorded call's query


def test_calls_autograd_records_or_with_per_call_tensors_are_not_replayed():
    """Inputs that require grad get outputs joined to the graph every time; a mask (classified per call) or
    dropout (a seed per call) is never recorded: each call stays checked, with its own values."""
    q, k, v = (torch.randn(1, 2, 24, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    for _ in range(3):
        out = fused_attn.attention(q, k, v, causal=True)
        assert out.grad_fn is not None
        out.sum().backward()
    assert list(fused_attn.replay.CALLS.calls.values()) == [fused_attn.replay.REFUSED]
    with torch.no_grad():
        masks = [torch.rand(24, 24, device=DEVICE) > p for p in (0.2, 0.5, 0.8)]
        outs = [fused_attn.scaled_dot_product_attention(q, k, v, attn_mask=m) for m in masks]
        for m, out in zip(masks, outs):
            ref = fused_attn.reference.attention(q.double(), k.double(), v.double(), attn_mask=m).float()
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    q, k, v = (torch.randn(1, 2, 24, 16, device=DEVICE) for _ in range(3))
    outs = [fused_attn.attention(q, k, v, dropout_p=0.5) for _ in range(3)]
    assert not torch.equal(outs[1], outs[2])
    assert all(isinstance(e, int) or e is fused_attn.replay.REFUSED for e in fused_attn.replay.CALLS.calls.values())


def test_a_call_one_field_away_from_the_last_replay_is_not_made_by_it():
    """The last replay is tried first (its `matches`, field by field): a call differing from it in one field of the
    key -- an argument, strides, dtype, alignment, requires_grad -- gets the result of a call checked anew."""
    g = torch.Generator(device="cpu").manual_seed(0)
    new = (lambda *s: torch.randn(*s, generator=g).to(DEVICE))
    q, k, v = new(1, 2, 24, 16), new(1, 2, 24, 16), new(1, 2, 24, 16)
    unaligned = new(q.numel() + 1)[1:].view_as(q).copy_(q)  # 4 bytes past a 16-byte boundary
    variants = {
        "argument": ((q, k, v), dict(causal=False)),
        "strides": ((new(1, 24, 2, 16).transpose(1, 2), k, v), dict(causal=True)),
        "dtype": ((q.half(), k.half(), v.half()), dict(causal=True)),
        "alignment": ((unaligned, k, v), dict(causal=True)),
        "requires_grad": ((q.clone().requires_grad_(), k, v), dict(causal=True)),
    }
    expected = {}
    for name, (tensors, kw) in variants.items():
        fused_attn.replay.clear()
        expected[name] = fused_attn.attention(*tensors, **kw)
    fused_attn.replay.clear()
    for name, (tensors, kw) in variants.items():
        for _ in range(3):  # q, k, v's layout replayed, the last replay
            fused_attn.attention(q, k, v, causal=True)
        assert isinstance(fused_attn.replay.CALLS.last, fused_attn.replay._Replay)
        got = fused_attn.attention(*tensors, **kw)
        assert torch.equal(got, expected[name]) and got.dtype == expected[name].dtype, name
        assert (got.grad_fn is not None) == (name == "requires_grad"), name


def _fake_kernel():
    """Stands for a kernel in a launch list that stubbed_launches records and never runs."""


def test_replays_rebuild_descriptors_and_bundles_on_the_new_tensors():
    """The TMA path's arguments (no TMA under the interpreter, so a stubbed launch): a TensorDescriptor over an
    input, a bundle holding a fresh buffer beside a constant, a result that views the buffer -- replayed on other
    tensors, every place takes the new call's tensor and the constants stay."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    from fused_attn.kernels import launch
    from fused_attn.replay import Replays, _Replay, key_of

    checked = []

    def call(x):
        checked.append(x)
        out = launch.fresh(torch.empty(2, 8, 8), float("-inf"))
        launch.run([(_fake_kernel, (3,), (TensorDescriptor.from_tensor(x, [4, 8]), (out, 7), 0.5), {})], "fake")
        return out[0].t()

    table = Replays(limit=4, sightings=0)
    with stubbed_launches() as log:
        a, b = torch.randn(8, 8), torch.randn(8, 8)
        table(key_of("fake"), (a,), call, (a,))
        assert isinstance(next(iter(table.calls.values())), _Replay)
        del log[:]
        got = table(key_of("fake"), (b,), call, (b,))
        (name, (desc, (buffer, seven), half)), = log
    assert len(checked) == 1 and name == "_fake_kernel" and seven == 7 and half == 0.5  # the second call replayed
    assert desc.base is b and list(desc.strides) == [8, 1] and list(desc.block_shape) == [4, 8]
    assert buffer.shape == (2, 8, 8) and torch.isneginf(buffer).all()
    assert got.shape == (8, 8) and got.stride() == (1, 8) and got.data_ptr() == buffer.data_ptr()
