"""The CPU-side parts of bench/: sweep construction, FLOP counts, result files, plots, the CLI's no-GPU exit."""
import csv
import json
import os

import pytest
import torch

import fused_attn
from bench import common, plot, run, sweep


def test_sweep_fixes_tokens_and_hidden():
    configs = sweep.build(seqlens=(512, 4096), head_dims=(64, 128), masks=("none", "causal", "window1024"),
                          modes=("fwd",), gqa_ratio=8, modifiers=())
    for c in configs:
        assert c.batch * c.seqlen == 16384 and c.heads_q * c.head_dim == 2048
        assert c.heads_kv in (c.heads_q, c.heads_q // 8)
    # window1024 is skipped at S=512 (it would be the causal case); each case once with MHA and once with GQA.
    assert not any(c.seqlen == 512 and c.mask == "window1024" for c in configs)
    assert len(configs) == 2 * (2 + 3) * 2
    assert {c.window for c in configs} == {(-1, -1), (-1, 0), (1023, 0)}


def test_sweep_modifier_rows():
    """softcap / ALiBi / dropout repeat the MHA causal D = 128 cases at S = 4096 and 16384, nothing else."""
    configs = sweep.build(seqlens=(1024, 4096, 16384), head_dims=(64, 128), masks=("none", "causal"),
                          modes=("fwd", "bwd"))
    extra = [c for c in configs if c.modifier != "none"]
    assert len(extra) == 3 * 2 * 2
    assert all(c.head_dim == 128 and c.mask == "causal" and not c.gqa and c.seqlen in (4096, 16384) for c in extra)
    for c in extra:
        base = [b for b in configs if b.modifier == "none" and (b.seqlen, b.head_dim, b.mask, b.mode, b.heads_kv) ==
                (c.seqlen, c.head_dim, c.mask, c.mode, c.heads_kv)]
        assert len(base) == 1 and base[0].flops() == c.flops()
    kw = {c.modifier: c.modifier_kwargs("cpu") for c in extra}
    assert kw["softcap"] == {"softcap": 50.0} and kw["dropout"] == {"dropout_p": 0.1}
    assert kw["alibi"]["alibi_slopes"].shape == (16,)


@pytest.mark.parametrize("provider,modifier,status", [
    ("fused_attn", "softcap", "ok"), ("fused_attn", "alibi", "ok"), ("fused_attn", "dropout", "ok"),
    ("sdpa-math", "alibi", "unsupported: SDPA has no alibi"), ("sdpa-math", "dropout", "ok"),
    ("reference", "dropout", "unsupported: the reference takes dropout as an explicit mask only")])
def test_modifier_providers_are_checked(provider, modifier, status):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = sweep.Config(64, 32, "causal", "fwd", 1, 4, 4, dtype="fp16", modifier=modifier)
    got, metric = run.check_provider(provider, cfg, device, {})
    assert got == status and (metric is None or metric.ok), metric


def test_sweep_without_gqa_and_gqa_only():
    assert all(not c.gqa for c in sweep.build(seqlens=(1024,), gqa_ratio=1))
    assert all(c.gqa for c in sweep.build(seqlens=(1024,), gqa_only=True))


@pytest.mark.parametrize("mask,pairs", [
    ("none", 1024 * 1024),
    ("causal", 1024 * 1025 // 2),
    ("window256", 256 * 257 // 2 + (1024 - 256) * 256),  # rows i < 256 see i + 1 keys, the rest 256
])
def test_flops_count_visible_pairs_exactly(mask, pairs):
    for mode, factor in (("fwd", 1.0), ("bwd", 2.5), ("fwd+bwd", 3.5)):
        c = sweep.Config(1024, 64, mask, mode, batch=2, heads_q=8, heads_kv=2)
        assert c.flops() == 4.0 * 2 * 8 * 64 * pairs * factor


def _rows():
    rows = []
    for provider, speed in (("fused_attn", 1.0), ("sdpa-flash", 0.8)):
        for s in (1024, 4096):
            for mask in ("causal", "window256", "window1024"):
                for mode in ("fwd", "fwd+bwd"):
                    cfg = sweep.Config(s, 64, mask, mode, 16384 // s, 32, 32)
                    ms = cfg.flops() / 1e12 / (300 * speed) * 1e3
                    rows.append(dict(gpu="Synthetic GPU", torch="x", triton="y", commit="abc", provider=provider,
                                     **cfg.as_dict(), status="ok", ms=ms, tflops=300 * speed, peak_mem_mb=1.0,
                                     check_err=0.0, check_budget=1.0))
    rows.append(dict(rows[0], provider="sdpa-cudnn", status="unsupported: no window", ms=None, tflops=None))
    return rows


def test_results_are_written_as_json_and_csv(tmp_path):
    rows = _rows()
    common.write(rows, {"gpu": "Synthetic GPU"}, tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["environment"]["gpu"] == "Synthetic GPU" and len(data["rows"]) == len(rows)
    with open(tmp_path / "results.csv") as f:
        back = list(csv.DictReader(f))
    assert len(back) == len(rows) and back[0]["window"] == "-1 0" and back[-1]["status"].startswith("unsupported")
    assert set(common.FIELDS) <= set(back[0])


def test_plots_from_synthetic_results(tmp_path):
    paths = plot.plot_all(_rows(), tmp_path)
    names = sorted(p.name for p in paths)
    assert names == ["throughput_d64_h32-32.png", "windows_d64.png"]
    import matplotlib.image as mpimg
    for p in paths:
        img = mpimg.imread(p)
        assert img.shape[0] > 200 and img.shape[1] > 400 and img[..., :3].std() > 0.01  # not blank


def test_cli_dry_run_and_no_gpu_exit(capsys):
    assert run.main(["--dry-run", "--seqlens", "2048", "--head-dims", "128", "--masks", "causal"]) == 0
    out = capsys.readouterr().out
    assert "S=  2048 D=128 B=  8 Hq= 16 Hkv= 16 causal" in out and "6 configurations x 14 providers" in out
    if not torch.cuda.is_available():
        assert run.main(["--seqlens", "2048"]) == 2
        assert "needs an NVIDIA GPU" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run.main(["--masks", "sliding"])


def test_plot_only_redraws_from_a_results_file(tmp_path, capsys):
    rows = _rows()
    rows.append(dict(rows[0], modifier="softcap"))
    common.write(rows, {"gpu": "Synthetic GPU"}, tmp_path)
    assert run.main(["--plot-only", str(tmp_path / "results.json"), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "plots" / "windows_d64.png").exists()
    assert plot._panel(rows[-1]) == "causal+softcap" and plot._panel(rows[0]) == "causal"


@pytest.mark.parametrize("provider,path", [("fused_attn", "ptr"), ("fused_attn-tma-lf", "tma"),
                                           ("fused_attn-lf", "ptr"), ("fused_attn-ws", "warp_spec"),
                                           ("fused_attn-persistent", "persistent"), ("reference", None)])
def test_providers_are_checked_against_the_reference(provider, path):
    from fused_attn import kernels
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if path in ("tma", "warp_spec") and device == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA and warp specialization need compute capability 9.0+")
    cfg = sweep.Config(96, 64, "window32", "fwd", 1, 8, 2, dtype="fp16")
    before = kernels.launches.copy()
    status, metric = run.check_provider(provider, cfg, device, {})
    assert status == "ok", metric
    assert metric.err <= metric.budget
    if path:  # the variant's path really ran
        assert kernels.launches[f"fwd:{path}"] == before[f"fwd:{path}"] + 1


def test_tune_candidates_and_cli(capsys):
    from bench import tune
    assert tune.main(["--dry-run", "--head-dims", "64", "256"]) == 0
    out = capsys.readouterr().out
    assert "D=64 fwd: 144 candidates" in out and "D=256 dkdv:" in out and "D=256 dq:" in out
    assert all(c.block_m * c.block_n <= 64 * 64 and c.split_dkdv for c in tune.candidates("dkdv", 256, 0))
    assert not any(c.split_dkdv for c in tune.candidates("dkdv", 128, 0) + tune.candidates("dq", 256, 0))
    assert {(c.tma, c.longest_first) for c in tune.candidates("fwd", 64, 0)} == {(False, False), (False, True),
                                                                                 (True, False), (True, True)}
    schedules = tune.candidates("fwd", 256, 0, paths=("persistent", "ws"))
    assert {(c.persistent, c.warp_specialize, c.tma, c.longest_first) for c in schedules} == {
        (True, False, True, False), (False, True, False, False), (False, True, False, True)}
    assert all(c.block_m == 128 and c.num_warps == 4 for c in schedules if c.warp_specialize)
    assert tune.candidates("dq", 64, 0, paths=("ws",)) == []
    if not torch.cuda.is_available():
        assert tune.main(["--head-dims", "64"]) == 2
        assert "needs an NVIDIA GPU" in capsys.readouterr().out


def test_varlen_case_counts_real_pairs():
    from bench import varlen
    assert sum(varlen.LENGTHS) == 16384 and min(varlen.LENGTHS) >= 128 and max(varlen.LENGTHS) <= 4096
    c = varlen.Case(64, "causal", "fwd", heads=32, lengths=(3, 5))
    assert c.flops() == 4.0 * 32 * 64 * (6 + 15)
    assert c.flops(padded=True) == 4.0 * 32 * 64 * 2 * 15
    assert varlen.Case(64, "none", "fwd+bwd", 32, lengths=(3, 5)).flops() == 4.0 * 32 * 64 * (9 + 25) * 3.5


def test_varlen_pad_and_unpad_are_inverse():
    from bench import varlen
    x = torch.randn(12, 2, 4)
    p = varlen.pad(x, (5, 0, 7))
    assert p.shape == (3, 2, 7, 4) and p[1].abs().sum() == 0 and p[0, :, 5:].abs().sum() == 0
    assert torch.equal(varlen.unpad(p, (5, 0, 7)), x)


@pytest.mark.parametrize("name", ["fused_attn-varlen", "fused_attn-dense-padded", "sdpa-math-padded"])
def test_varlen_providers_pass_their_check(name, monkeypatch):
    """The providers compute what they claim on the CPU too (kernels through the interpreter, SDPA's math backend
    standing in for the GPU backends: the same padding mask)."""
    from bench import varlen
    monkeypatch.setitem(varlen.PROVIDERS, "sdpa-math-padded", varlen._sdpa_padded("MATH"))
    monkeypatch.setitem(varlen.DTYPES, "fp32", torch.float32)
    status, metric = varlen.check(name, varlen.Case(32, "causal", "fwd", 2, dtype="fp32"), "cpu", {})
    assert status == "ok", (status, metric)


def test_decode_sweep_and_bytes(capsys):
    from bench import decode
    cases = decode.build()
    assert len(cases) == 3 * 4 * 2 * 3 and {c.page for c in cases} == {0, 16, 256}
    c = decode.Case(8, 32768, 1, 16)
    assert c.kv_bytes() == 2 * 8 * 32768 * 8 * 128 * 2
    assert run.main(["--decode", "--dry-run"]) == 0
    assert "decode: 72 configurations x 5 providers" in capsys.readouterr().out
    # --seqlens are the cache lengths, --head-dims the head dims
    assert run.main(["--decode", "--dry-run", "--seqlens", "2048", "--head-dims", "64", "256"]) == 0
    out = capsys.readouterr().out
    assert "decode: 36 configurations" in out and "cache=   2048" in out and "D=256" in out
    assert "cache=   1024" not in out


@pytest.mark.parametrize("argv,refused", [
    (["--decode", "--masks", "causal"], "--decode does not take --masks"),
    (["--decode", "--modes", "fwd"], "--decode does not take --modes"),
    (["--decode", "--tokens", "4096", "--gqa-ratio", "2"], "--decode does not take --gqa-ratio, --tokens"),
    (["--varlen", "--seqlens", "1024"], "--varlen does not take --seqlens"),
    (["--varlen", "--masks", "window256"], "--varlen takes the masks none and causal"),
    (["--varlen", "--modifiers", "softcap"], "--varlen does not take --modifiers"),
    (["--dtype", "fp32"], "--dtype fp32 is for --decode only"),
    (["--serving", "--masks", "causal"], "--serving does not take --masks"),
])
def test_options_a_benchmark_does_not_take_are_refused(argv, refused, capsys):
    """A flag is honoured or refused with a message, never ignored."""
    with pytest.raises(SystemExit):
        run.main(argv + ["--dry-run"])
    assert refused in capsys.readouterr().err


def test_varlen_honours_its_options(capsys):
    assert run.main(["--varlen", "--dry-run", "--head-dims", "64", "--masks", "causal", "--modes", "fwd",
                     "--hidden", "1024"]) == 0
    out = capsys.readouterr().out
    assert "varlen: 1 configurations" in out and "varlen D= 64 H=16 causal fwd" in out


@pytest.mark.parametrize("page", [0, 16])
def test_decode_provider_passes_its_check(page):
    from bench import decode
    status, metric = decode.check("fused_attn-kvcache", decode.Case(1, 1, 4, page, dtype="fp32"), "cpu", {})
    assert status == "ok", (status, metric)


def test_serving_steps_and_bytes(capsys):
    from bench import serving
    cases = serving.build()
    assert len(cases) == 2 * 3 * 2 * 2 and {c.kv for c in cases} == {"bf16", "fp8"}
    c = serving.Case(2048, 63, 32768, 16, "fp8")
    assert c.lens_q == [2048] + [1] * 63 and c.kv_bytes() == 2 * 64 * 32768 * 8 * 128 * 1
    assert run.main(["--serving", "--dry-run", "--seqlens", "4096"]) == 0
    out = capsys.readouterr().out
    assert "serving: 8 configurations x 4 providers" in out and "serving 2048+63x1 cache=  4096" in out


@pytest.mark.parametrize("page", [16, 32])
def test_serving_flex_reads_the_pages_in_place(page, monkeypatch):
    """FlexAttention's serving provider attends the paged cache through a block mask of physical pages: checked
    against the float64 reference with eager flex_attention (the benchmark compiles it), pages shuffled, a cache
    length that is not a multiple of the page."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from bench import serving
    monkeypatch.setattr(serving, "flex", lambda: (flex_attention, create_block_mask))
    status, metric = serving.check("flex", serving.Case(2048, 63, 32768, page, dtype="fp32"), "cpu", {})
    assert status == "ok", metric
    assert metric.err <= metric.budget
    # Eager flex_attention applies the mask function everywhere; the compiled kernel walks the listed blocks only:
    # the listed physical blocks must be exactly those holding a visible pair.
    case = serving.Case(300, 3, 600, page, "bf16", 4, 2, 64, "fp32")  # three 128-row blocks, each its own pages
    q, _, _, cu, _, table, _ = serving.inputs(case, "cpu")
    block_mask, mask = serving.paged_block_mask(case, q, cu, table, create_block_mask)
    kv = torch.arange(table.numel() * page)
    visible = mask(0, 0, torch.arange(q.shape[0])[:, None], kv[None, :])
    rows = -(-q.shape[0] // 128)
    truth = torch.nn.functional.pad(visible, (0, 0, 0, rows * 128 - q.shape[0])).view(rows, 128, -1, page).any(3).any(1)
    assert torch.equal(block_mask.to_dense()[0, 0].bool(), truth)


@pytest.mark.parametrize("name", ["fused_attn-serving", "fused_attn-separate"])
def test_serving_providers_pass_their_check(name):
    """fused_attn's one call and its two separate calls on a small step, FP8 cache and pages of 16."""
    from bench import serving
    status, metric = serving.check(name, serving.Case(2048, 63, 32768, 16, "fp8", dtype="fp16"), "cpu", {})
    assert status == "ok", (status, metric)


def test_flex_cases_count_visible_pairs_exactly(capsys):
    from bench import flex
    doc = flex.document_ids(1000, "cpu")
    lengths = torch.bincount(doc).tolist()
    assert len(lengths) == 50 and sum(lengths) == 1000 and min(lengths) >= 1
    fn, band = flex.mask_function("documents", 1000, "cpu")
    bm = fused_attn.create_block_mask(fn, None, None, 1000, 1000, "cpu", BLOCK_SIZE=64)
    assert band is None and flex.visible_pairs(bm) == sum(n * (n + 1) // 2 for n in lengths)
    fn, band = flex.mask_function("sliding100", 1000, "cpu")
    bm = fused_attn.create_block_mask(fn, None, None, 1000, 1000, "cpu")
    assert band == (True, (99, 0)) and flex.visible_pairs(bm) == 100 * 101 // 2 + 900 * 100
    assert flex.mask_pairs("sliding100", 1000, "cpu") == flex.visible_pairs(bm)
    assert run.main(["--flex", "--dry-run", "--head-dims", "64", "--masks", "documents", "sliding512"]) == 0
    assert "flex: 4 configurations x 6 providers" in capsys.readouterr().out


@pytest.mark.parametrize("name,mask,status", [("fused_attn-flex", "documents", "ok"),
                                              ("fused_attn-flex-jit", "documents", "ok"),
                                              ("fused_attn-sdpa-mask", "prefix_lm", "ok"),
                                              ("fused_attn-builtin", "sliding1024", "ok"),
                                              ("fused_attn-builtin", "prefix_lm", "unsupported")])
def test_flex_providers_pass_their_check(name, mask, status, monkeypatch):
    from bench import flex
    monkeypatch.setitem(flex.DTYPES, "fp32", torch.float32)
    got, metric = flex.check(name, flex.Case(mask, 32, "fwd", 2, dtype="fp32"), "cpu", {})
    assert got.startswith(status), (got, metric)


def test_a_provider_that_raises_becomes_an_error_row(tmp_path):
    """One provider's exception is reported in its row; the sweep goes on (a GPU run is not lost to one crash)."""
    import types
    from dataclasses import dataclass

    from bench import common

    @dataclass(frozen=True)
    class Case:
        n: int

        def as_dict(self):
            return {"seqlen": self.n}

    def check(name, case, device, cache):
        if name == "broken":
            raise KeyError("no such kernel")
        return "ok", None

    fake = types.SimpleNamespace(check=check, measure=lambda name, case, device: ("ok", 1.5, None),
                                 derived=lambda case, name, ms: {}, label=lambda case: f"n={case.n}")
    rows = common.sweep(fake, [Case(1), Case(2)], ["broken", "fine"], {"gpu": "none", "torch": "-", "triton": "-",
                                                                       "commit": "-"}, tmp_path, "fake")
    assert [r["status"] for r in rows] == ["error: KeyError: 'no such kernel'", "ok"] * 2
    assert [r["ms"] for r in rows] == [None, 1.5] * 2 and (tmp_path / "results.json").exists()


def test_gpu_session_plan_fits_and_picks_the_slowest_rows(tmp_path, capsys, monkeypatch):
    """Each part's steps fit its budget, with or without a traveling cache (installed before the warm-up); the dry
    run prints the plan and a compile count; part 2 tunes the rows where fused_attn's best variant trails the best
    peer most."""
    from bench import session
    for steps in (session.part1_steps("o"), session.part2_steps("o", None)):
        assert sum(budget for _, budget, _ in steps) <= session.PART_BUDGET
        assert "travel-cache" not in [name for name, _, _ in steps]
    (tmp_path / "manifest.json").write_text("{}")
    monkeypatch.setattr(session, "TRAVELED", str(tmp_path))
    names = [name for name, _, _ in session.part1_steps("o")]
    assert names.index("travel-cache") + 1 == names.index("warm-cache")
    assert sum(budget for _, budget, _ in session.part1_steps("o")) <= session.PART_BUDGET
    monkeypatch.undo()
    assert session.main(["--part", "1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "headline" in out and "distinct fused_attn kernels to compile for sm_90" in out
    row = dict(status="ok", head_dim=128, mode="fwd")
    rows = [dict(row, provider="fused_attn-ws", mask="none", ms=1.0), dict(row, provider="sdpa-cudnn", mask="none",
                                                                         ms=1.0),
            dict(row, provider="fused_attn", mask="causal", ms=3.0), dict(row, provider="flex", mask="causal", ms=1.5),
            dict(row, provider="fused_attn-tma", mask="causal", ms=2.0)]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"rows": rows}))
    assert session.slowest_rows(str(path), n=1) == [(2.0 / 1.5, 128, "causal")]
    (name, _, cmd), = session.part2_steps("o", str(path))[:1]
    assert name == "tune-d128-causal" and "--paths" in cmd


def _fake_wheel(path, version, libtriton=b"another build", edit=None):
    """A wheel holding this Triton's Python sources (edit: one of them changed) and a libtriton of its own."""
    import zipfile
    import triton
    root = os.path.dirname(triton.__file__)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"triton-{version}.dist-info/METADATA", "Name: triton\n")
        for d, _, files in os.walk(root):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(d, f), root)
                    data = open(os.path.join(d, f), "rb").read()
                    z.writestr(f"triton/{rel}", data + b"#" if rel == edit else data)
        z.writestr("triton/_C/libtriton.so", libtriton)
    return str(path)


def test_travel_cache_keys_for_the_other_build_only(tmp_path):
    """A cache built here travels under the key of the GPU machine's wheel: this Triton's key with the wheel's
    libtriton hash, and only for a wheel of the same version and sources; installing copies the entries (group
    files pointed at their new place) only where the key matches."""
    import hashlib
    import triton
    from triton.runtime import cache
    from bench import travel_cache
    other = travel_cache.wheel_key(_fake_wheel(tmp_path / "a.whl", triton.__version__))
    mine = cache.triton_key()
    with open(os.path.join(os.path.dirname(triton.__file__), "_C", "libtriton.so"), "rb") as f:
        ours = hashlib.sha256(f.read()).hexdigest()
    assert ours in mine and other == mine.replace(ours, hashlib.sha256(b"another build").hexdigest())
    with pytest.raises(ValueError, match="holds triton"):
        travel_cache.wheel_key(_fake_wheel(tmp_path / "b.whl", "0.0.1"))
    with pytest.raises(ValueError, match="differs"):
        travel_cache.wheel_key(_fake_wheel(tmp_path / "c.whl", triton.__version__, edit="language/core.py"))

    src, dest = tmp_path / "src", tmp_path / "dest"
    entry = src / "ABC"
    entry.mkdir(parents=True)
    for name in ("k.json", "k.cubin", "k.ptx", "k.llir"):
        (entry / name).write_text(name)
    (entry / "__grp__k.json").write_text(json.dumps({"child_paths": {n: f"/elsewhere/ABC/{n}" for n in
                                                                     ("k.json", "k.cubin", "k.ptx", "k.llir")}}))
    travel_cache._regroup(str(entry))
    assert sorted(os.listdir(entry)) == ["__grp__k.json", "k.cubin", "k.json", "k.ptx"]
    manifest = dict(triton=triton.__version__, wheel="w", key_sha256=hashlib.sha256(other.encode()).hexdigest(),
                    entries=["ABC"], kernels=1, compile_seconds=1.0)
    (src / "manifest.json").write_text(json.dumps(manifest))
    assert "not used" in travel_cache.install(str(src), str(dest)) and not dest.exists()
    (src / "manifest.json").write_text(json.dumps(dict(manifest, key_sha256=hashlib.sha256(mine.encode()).hexdigest())))
    assert "1 of 1 entries installed" in travel_cache.install(str(src), str(dest))
    group = json.loads((dest / "ABC" / "__grp__k.json").read_text())["child_paths"]
    assert group == {n: str(dest / "ABC" / n) for n in ("k.json", "k.cubin", "k.ptx")}
    assert all(os.path.exists(p) for p in group.values())
