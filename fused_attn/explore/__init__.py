"""The attention explorer: `python -m fused_attn explore` serves a Streamlit page (optional extra "app") that runs a
causal LM on a text with its attention on the kernels and shows the attention weights of chosen layers, heads and
query rows, rebuilt from the kernels' log-sum-exp, the layer's mask, and how far the kernels' weights are from
the eager model's. `analysis` holds the computations (no Streamlit), `model` the demo and local-directory models,
`app` the page."""
