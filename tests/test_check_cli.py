"""The main job, `python -m fused_attn check`, in-process (the interpreter is already chosen by conftest)."""
import json

import pytest

from fused_attn.__main__ import main


def test_check_quick_passes_and_round_trips_a_baseline(tmp_path, capsys):
    base = tmp_path / "base.json"
    assert main(["check", "--quick", "--save-baseline", str(base)]) == 0
    text = capsys.readouterr().out
    assert "PASS" in text and "FAIL" not in text and "cases passed" in text
    saved = json.loads(base.read_text())
    assert saved["environment"]["torch"] and len(saved["cases"]) >= 6
    assert all(set(errs) == {"out", "lse", "dq", "dk", "dv"} for errs in saved["cases"].values())

    # Same machine, same code: no error grew.
    assert main(["check", "--quick", "--baseline", str(base)]) == 0
    capsys.readouterr()

    # A baseline whose errors are far smaller than today's (and than the rounding floor) flags growth.
    shrunk = {name: {k: v / 1000 for k, v in errs.items()} for name, errs in saved["cases"].items()}
    (tmp_path / "tight.json").write_text(json.dumps({"environment": {}, "cases": shrunk}))
    assert main(["check", "--quick", "--baseline", str(tmp_path / "tight.json")]) == 1
    assert "grew >2x vs baseline" in capsys.readouterr().out


def test_check_rejects_unknown_options():
    with pytest.raises(SystemExit):
        main(["check", "--fast"])
