"""The attention explorer (fused_attn.explore): its computations, the page driven by Streamlit's headless app
testing, and the page served and rendered by a real headless Chromium (skipped where none is installed)."""
import os
import shutil
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch

pytest.importorskip("streamlit")
pytest.importorskip("transformers")

from streamlit.testing.v1 import AppTest  # noqa: E402

from fused_attn import attention_probs, kernels  # noqa: E402
from fused_attn.explore import analysis, model  # noqa: E402

APP = os.path.join(os.path.dirname(analysis.__file__), "app.py")
RUNNING = "Running the model (on a CPU the kernels run through the Triton interpreter: this can take minutes)"
TEXT = "The kernels keep a running maximum and sum for each row, and return the log-sum-exp of the scores."


@pytest.fixture(scope="module")
def demo():
    return model.load()


@pytest.fixture(scope="module")
def result(demo):
    before = kernels.launches["fwd"]
    run = analysis.run(demo, TEXT)
    run.launched = kernels.launches["fwd"] - before
    return run


def test_capture_runs_the_kernels_and_matches_eager(demo, result):
    n = len(result.ids)
    assert result.launched == len(result.layers) == demo.model.config.num_hidden_layers  # one kernel run per layer
    assert n > demo.model.config.sliding_window  # long enough for the demo's window to hide keys
    for layer in result.layers:
        assert layer.q.shape == (1, 4, n, 16) and layer.k.shape == (1, 2, n, 16) and layer.lse.shape == (1, 4, n)
        assert layer.mask == dict(causal=True, window_size=(model.DEMO_WINDOW - 1, 0))
    table = analysis.errors(result, slice(0, n))
    assert all(row["within the rule"] for row in table), table
    # The eager model's own weights: equal to fp32 rounding of the scores (a wrong capture -- another layer's q / k,
    # the wrong window or scale -- is off by more than 1e-2).
    assert all(row["max |kernels - eager|"] < 1e-5 for row in table), table
    w = analysis.weights(result.layers[0], slice(n - 1, n))  # the last row: a window of keys, summing to 1
    assert torch.all(w[:, 0, :n - model.DEMO_WINDOW] == 0) and torch.allclose(w.sum(-1), torch.ones(4, 1))


def test_local_model_directory(demo, result, tmp_path):
    """A Hugging Face directory (here the demo saved with save_pretrained) loads without network and runs."""
    demo.model.save_pretrained(tmp_path)
    demo.tokenizer.save_pretrained(tmp_path)
    loaded = model.load(str(tmp_path))
    assert not loaded.demo and loaded.name == tmp_path.name
    again = analysis.run(loaded, TEXT)
    assert again.ids == result.ids and again.tokens == result.tokens
    assert all(torch.equal(a.lse, b.lse) for a, b in zip(again.layers, result.layers))


def test_bad_input_says_what_is_wrong(demo, tmp_path):
    with pytest.raises(ValueError, match="enter some text"):
        analysis.tokenize(demo, "  \n")
    with pytest.raises(ValueError, match=r"more than the model's 128 positions"):
        analysis.tokenize(demo, "fox " * 200)
    with pytest.raises(ValueError, match="does not exist or is not a directory"):
        model.load(str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match="cannot load a causal LM and its tokenizer from"):
        model.load(str(tmp_path))


def _page():
    at = AppTest.from_file(APP, default_timeout=300)
    at.run()
    assert not at.exception, at.exception
    return at


def test_page_shows_the_kernels_weights_for_the_chosen_rows(result):
    at = _page()
    assert at.title[0].value == "fused_attn attention explorer"
    assert "random weights" in at.info[0].value  # the demo says its attention is noise
    at.text_area(key="text").input(TEXT).run()  # the sliders' ranges follow the text's length
    at.selectbox(key="layer").select(1)
    at.selectbox(key="head").select(2)
    at.slider(key="rows").set_value((5, 12))
    at.slider(key="keys").set_value((2, 20))
    at.run()
    assert not at.exception and not at.error, (at.exception, at.error)
    layer = result.layers[1]
    want = attention_probs(layer.q, layer.k, layer.lse, queries=slice(5, 13), **layer.kw)[0, 2, :, 2:21].numpy()
    shown = at.session_state["heatmap"]
    assert (shown["layer"], shown["heads"], shown["rows"], shown["keys"]) == (1, [2], (5, 12), (2, 20))
    np.testing.assert_array_equal(shown["weights"][0], want)
    table = at.dataframe[0].value  # "The numbers" under the heatmap
    np.testing.assert_array_equal(table.to_numpy(), want)
    assert list(table.index)[0] == f"5: {result.tokens[5]!r}" and list(table.columns)[-1] == f"20: {result.tokens[20]!r}"
    errors = at.dataframe[1].value
    assert list(errors["layer"]) == [0, 1] and errors["within the rule"].all(), errors

    at.radio(key="heads").set_value("all heads").run()
    assert at.session_state["heatmap"]["weights"].shape == (4, 8, 19)


@pytest.mark.parametrize("field, value, message", [
    pytest.param("text", "", "enter some text", id="empty-text"),
    pytest.param("text", "fox " * 200, "more than the model's 128 positions", id="too-long"),
    pytest.param("model_dir", "/nonexistent/model", "does not exist or is not a directory", id="no-directory"),
])
def test_page_reports_bad_input_as_a_message(field, value, message):
    at = _page()
    widget = at.sidebar.text_input(key=field) if field == "model_dir" else at.text_area(key=field)
    widget.input(value).run()
    assert not at.exception, at.exception
    assert len(at.error) == 1 and message in at.error[0].value, [e.value for e in at.error]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _wait_for(url, seconds):
    for _ in range(int(seconds * 2)):
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                return r.read()
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


def _render(url, shot, ready_js, port, seconds=240):
    """Open `url` in headless Chromium driven over the DevTools protocol (on `port`), wait until the page's JavaScript
    `ready_js` is true (Streamlit draws the page over a websocket after load, so the page's load event is too
    early), then save a full-page screenshot to `shot`; returns the rendered DOM."""
    import base64
    import json

    from websockets.sync.client import connect  # a Streamlit dependency
    browser = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                f"--remote-debugging-port={port}", "--window-size=1400,1000", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        pages = json.loads(_wait_for(f"http://127.0.0.1:{port}/json/list", 60))
        with connect(next(p for p in pages if p["type"] == "page")["webSocketDebuggerUrl"], max_size=None) as ws:
            calls = iter(range(1, 10 ** 6))

            def call(method, **params):
                n = next(calls)
                ws.send(json.dumps({"id": n, "method": method, "params": params}))
                while True:
                    msg = json.loads(ws.recv(timeout=seconds))
                    if msg.get("id") == n:
                        return msg.get("result", {})

            def evaluate(js):
                return call("Runtime.evaluate", expression=js, returnByValue=True)["result"].get("value")
            call("Page.navigate", url=url)
            deadline = time.time() + seconds
            while not evaluate(ready_js):
                assert time.time() < deadline, "the page did not finish rendering"
                time.sleep(1)
            time.sleep(2)  # let the images paint
            height = evaluate("document.querySelector('[data-testid=stMain]')?.scrollHeight || "
                              "document.body.scrollHeight")
            call("Emulation.setDeviceMetricsOverride", width=1400, height=int(height), deviceScaleFactor=1,
                 mobile=False)
            time.sleep(1)
            shot.write_bytes(base64.b64decode(call("Page.captureScreenshot", format="png")["data"]))
            return evaluate("document.documentElement.outerHTML")
    finally:
        browser.terminate()
        browser.wait(timeout=30)


@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium installed (Debian: apt-get install chromium)")
def test_served_page_renders_in_a_browser(tmp_path, free_port):
    """`python -m fused_attn explore` served on a loopback port and rendered by headless Chromium: the page shows
    the title, the heatmap, the mask and the error table, and the screenshot is not blank.
    FUSED_ATTN_SCREENSHOT=path keeps a copy of the screenshot (the README's)."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "fused_attn", "explore", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shot = tmp_path / "explorer.png"
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_for(url + "/_stcore/health", 120)
        ready = ("document.querySelectorAll('[data-testid=stImage] img').length >= 2 && "
                 "document.querySelectorAll('[data-testid=stDataFrame]').length >= 1 && "
                 "!document.querySelector('[data-testid=stStatusWidget]')?.innerText.includes('Running')")
        dom = _render(url, shot, ready, free_port())
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert "fused_attn attention explorer" in dom and "The mask as the kernels see it" in dom
    import matplotlib.image
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] > 1000 and pixels[..., :3].std() > 0.05  # rendered, not a blank page
    if os.environ.get("FUSED_ATTN_SCREENSHOT"):
        shutil.copy(shot, os.environ["FUSED_ATTN_SCREENSHOT"])


def test_page_shows_its_title_and_running_state_before_the_model_runs(monkeypatch):
    """The first thing the page draws is its title and a "running the model" state: with the model run held at its
    start (it stops the script there), the page already shows both; after a full run the state says it is done."""
    import streamlit as st

    def held(*args, **kwargs):
        st.stop()

    def status(at):
        return [c for c in at.main.children.values() if type(c).__name__ == "Status"]
    st.cache_resource.clear()
    monkeypatch.setattr(analysis, "run", held)
    at = _page()
    shown = list(at.main.children.values())
    assert at.title[0].value == "fused_attn attention explorer" and shown[0] == at.title[0]
    assert [s.label for s in status(at)] == [RUNNING] and status(at)[0] == shown[1]
    assert not at.dataframe and not at.error  # nothing of the results yet
    monkeypatch.undo()
    st.cache_resource.clear()
    at = _page()
    label = status(at)[0].label
    assert label.startswith("Ran demo") and label.endswith(" tokens"), label
