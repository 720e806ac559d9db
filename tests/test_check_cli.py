"""The main job, `python -m fused_attn check`, in-process (the interpreter is already chosen by conftest)."""
import json

import pytest

from fused_attn.__main__ import main


def test_check_passes_and_round_trips_a_baseline(tmp_path, capsys, monkeypatch):
    # The second run compares against a baseline: it takes the first run's measurements of each case again
    # (the kernels ran once; what is tested there is the comparison).
    from fused_attn import check
    measured, evaluate = {}, check.evaluate

    def once(case, device):
        if case.name not in measured:
            measured[case.name] = evaluate(case, device)
        return measured[case.name]
    monkeypatch.setattr(check, "evaluate", once)
    base = tmp_path / "base.json"
    assert main(["check", "--save-baseline", str(base)]) == 0
    text = capsys.readouterr().out
    assert "PASS" in text and "FAIL" not in text and "cases passed" in text
    saved = json.loads(base.read_text())
    assert saved["environment"]["torch"] and len(saved["cases"]) >= 6
    assert all(set(errs) == {"out", "lse", "dq", "dk", "dv"} for errs in saved["cases"].values())

    # One run against a baseline that keeps one case as saved and shrinks the others' errors far below today's
    # (and the rounding floor): the kept case passes (same machine, same code: nothing grew), growth is flagged.
    kept = sorted(saved["cases"])[0]
    cases = {name: errs if name == kept else {k: v / 1000 for k, v in errs.items()}
             for name, errs in saved["cases"].items()}
    (tmp_path / "tight.json").write_text(json.dumps({"environment": {}, "cases": cases}))
    assert main(["check", "--baseline", str(tmp_path / "tight.json")]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert any("grew >2x vs baseline" in line for line in lines)
    assert [line for line in lines if line.startswith(kept + " ")][0].split("  [")[0].endswith("PASS")


@pytest.mark.parametrize("option", ["--fast", "--quick"])
def test_check_rejects_unknown_options(option, capsys):
    """--quick was accepted and never read (the small sweep is the default): refused like any unknown flag."""
    with pytest.raises(SystemExit):
        main(["check", option])
    assert f"unrecognized arguments: {option}" in capsys.readouterr().err


def test_progress_without_a_terminal_ends_each_line_with_count_and_times():
    import io
    from fused_attn.progress import Progress
    buf = io.StringIO()
    p = Progress(2, "t", file=buf)
    p.current("case a")
    p.advance("case a: ok")
    p.advance("case b: ok")
    p.close()
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("case a: ok  [1/2, 00:00 elapsed, ~00:00 left]")
    assert lines[1].startswith("case b: ok  [2/2, ") and len(lines) == 2


def test_progress_on_a_terminal_draws_a_bar():
    import io
    from fused_attn.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    buf = Terminal()
    p = Progress(2, "check", file=buf)
    p.current("case a")
    p.advance("case a: ok")
    p.close()
    out = buf.getvalue()
    assert "case a: ok\n" in out and "check:" in out and "/2 [" in out and "\r" in out  # tqdm redraws in place
