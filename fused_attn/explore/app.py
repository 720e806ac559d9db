"""The attention explorer page (Streamlit): `python -m fused_attn explore [--model DIR] [--port N]` starts it.
The model directory comes from FUSED_ATTN_EXPLORE_MODEL (set by that command) and can be changed on the page."""
import os

import streamlit as st

TITLE = "fused_attn attention explorer"
DEFAULT_TEXT = ("The quick brown fox jumps over the lazy dog. Attention lets every token look back at the ones before "
                "it.")
RUNNING = "Running the model (on a CPU the kernels run through the Triton interpreter: this can take minutes)"

# The title and the running state first: everything below (imports, model, kernels) can take minutes on a CPU.
st.set_page_config(page_title=TITLE, layout="wide")
st.title(TITLE)
status = st.status(RUNNING, expanded=False)

import torch  # noqa: E402

if not torch.cuda.is_available():  # this script is a program: without a GPU the kernels run in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from fused_attn import viz  # noqa: E402
from fused_attn.explore import analysis, model  # noqa: E402


@st.cache_resource(max_entries=2, show_spinner="loading the model")
def load(model_dir: str):
    return model.load(model_dir or None)


@st.cache_resource(max_entries=8, show_spinner="running the model")
def run(model_dir: str, text: str):
    return analysis.run(load(model_dir), text)


def show(fig):
    st.pyplot(fig)
    plt.close(fig)


def labels(tokens, positions):
    return [f"{p}: {tokens[p]!r}" for p in positions]


def stop(message: str):
    status.update(label="Stopped: see the message below", state="error")
    st.error(message)
    st.stop()


model_dir = st.sidebar.text_input("Model directory (empty: the built-in demo)",
                                  os.environ.get("FUSED_ATTN_EXPLORE_MODEL", ""), key="model_dir").strip()
try:
    loaded = load(model_dir)
except ValueError as e:
    stop(str(e))
device = next(loaded.model.parameters()).device
st.sidebar.write(f"**{loaded.name}** on {'the CPU (Triton interpreter)' if device.type == 'cpu' else device}")
if loaded.demo:
    st.info("This is the built-in demo: a tiny Mistral-style model with random weights and a tokenizer trained "
            "on one paragraph. Its attention is noise -- load a trained model (a local Hugging Face directory) to "
            "see what a model attends to.")

text = st.text_area("Text", DEFAULT_TEXT, key="text")
try:
    result = run(model_dir, text)
except ValueError as e:
    stop(str(e))
tokens, S = result.tokens, len(result.tokens)
status.update(label=f"Ran {loaded.name} on {S} tokens", state="complete")
st.caption(f"{S} tokens")
st.markdown(" ".join(f"`{i}` {t!r}" for i, t in enumerate(tokens)))

c1, c2, c3 = st.columns(3)
layer_idx = c1.selectbox("Layer", range(len(result.layers)), key="layer")
heads = c2.radio("Heads", ["one head", "all heads"], horizontal=True, key="heads")
head = c3.selectbox("Head", range(result.heads), key="head", disabled=heads == "all heads")
r0, r1 = st.slider("Query rows", 0, S - 1, (max(0, S - 16), S - 1), key="rows") if S > 1 else (0, 0)
k0, k1 = st.slider("Keys", 0, S - 1, (0, S - 1), key="keys") if S > 1 else (0, 0)
layer = result.layers[layer_idx]
rows, keys = range(r0, r1 + 1), range(k0, k1 + 1)

# Only the selected rows are rebuilt from the kernels' log-sum-exp (long inputs stay cheap).
w = analysis.weights(layer, slice(r0, r1 + 1))[:, :, k0:k1 + 1].cpu().numpy()
shown = list(range(result.heads)) if heads == "all heads" else [head]
st.session_state["heatmap"] = {"layer": layer_idx, "heads": shown, "rows": (r0, r1), "keys": (k0, k1),
                               "weights": w[shown]}
st.subheader(f"Attention weights, layer {layer_idx}" + ("" if heads == "all heads" else f", head {head}"))
st.caption(f"{analysis.describe(layer)}. Rows are queries, columns keys; each row sums to 1 over all its keys.")
if heads == "all heads":
    show(viz.draw_weights(w, [f"head {h}" for h in shown], rows, keys))
else:
    show(viz.draw_weights(w[shown], [f"head {head}"], rows, keys, labels(tokens, rows), labels(tokens, keys)))
    with st.expander("The numbers"):
        st.dataframe(pd.DataFrame(w[head], index=labels(tokens, rows), columns=labels(tokens, keys)))

st.subheader("The mask as the kernels see it")
mask_col, _ = st.columns([2, 3])
with mask_col:
    show(viz.plot_mask(S, S, **layer.mask).figure)

st.subheader("Kernels against the eager model")
st.caption("Per layer, over the selected query rows and every head: the largest difference of the kernels' "
           "weights from the eager model's, and the numerics rule against the float64 reference computed from the "
           "same q and k: within 2x PyTorch's own error in the model's dtype plus a rounding floor (that of the "
           "weights and of their float32 log-sum-exp).")
table = pd.DataFrame(analysis.errors(result, slice(r0, r1 + 1)))
st.dataframe(table.style.format("{:.1e}", subset=[c for c in table.columns if c.startswith(("max", "allowed"))]),
             hide_index=True)
