"""Pictures of attention: the mask (and which tiles the kernels skip) and attention weights per head, rebuilt
exactly from the kernel's log-sum-exp. Needs matplotlib."""
from dataclasses import dataclass

import matplotlib
import matplotlib.pyplot as plt  # the user's backend is left alone (headless machines get Agg by default)
import numpy as np
import torch

from .function import attention, attention_probs
from .mask import diagonal_offset, visible_mask, window_bounds

SKIPPED, MASKED_TILE, FULL_TILE = 0, 1, 2


@dataclass
class MaskPicture:
    figure: "matplotlib.figure.Figure"
    visible: np.ndarray  # (Sq, Sk) 1.0 where row i sees column j, else 0.0 -- the data behind the heatmap
    tiles: np.ndarray  # (Sq / block_m, Sk / block_n): SKIPPED, MASKED_TILE (visited with the mask), FULL_TILE


def tile_kinds(visible: np.ndarray, block_m: int, block_n: int) -> np.ndarray:
    """How the kernels treat each (block_m x block_n) tile: never visited, visited with the mask, or visited
    without it (every cell visible). tests/test_masks.py checks the kernels' own ranges agree."""
    sq, sk = visible.shape
    tm, tn = -(-sq // block_m), -(-sk // block_n)
    kinds = np.zeros((tm, tn), dtype=np.int64)
    for a in range(tm):
        for b in range(tn):
            tile = visible[a * block_m:(a + 1) * block_m, b * block_n:(b + 1) * block_n]
            full = tile.all() and (b + 1) * block_n <= sk
            kinds[a, b] = FULL_TILE if full else MASKED_TILE if tile.any() else SKIPPED
    return kinds


def plot_mask(seqlen_q, seqlen_k, causal=False, window_size=(-1, -1), alignment="bottom_right", block_m=16,
              block_n=16, path=None, ax=None) -> MaskPicture:
    """Heatmap of which keys (columns) each query (rows) sees, with the kernels' tiles drawn over it: tiles the
    kernels skip are hatched grey, masked boundary tiles outlined in orange, fully visible tiles in green."""
    left, right = window_bounds(causal, window_size)
    offset = diagonal_offset(seqlen_q, seqlen_k, alignment)
    visible = visible_mask(seqlen_q, seqlen_k, left, right, offset).numpy().astype(np.float64)
    kinds = tile_kinds(visible > 0, block_m, block_n)
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(min(12, 2 + seqlen_k / 6), min(12, 1.5 + seqlen_q / 6)))
    ax.imshow(visible, cmap="Blues", vmin=0, vmax=1.4, interpolation="nearest", aspect="auto")
    colors = {SKIPPED: "0.6", MASKED_TILE: "tab:orange", FULL_TILE: "tab:green"}
    for (a, b), kind in np.ndenumerate(kinds):
        h = min(block_m, seqlen_q - a * block_m)
        w = min(block_n, seqlen_k - b * block_n)
        ax.add_patch(matplotlib.patches.Rectangle(
            (b * block_n - 0.5, a * block_m - 0.5), w, h, fill=kind == SKIPPED, facecolor="0.85",
            hatch="//" if kind == SKIPPED else None, edgecolor=colors[kind], linewidth=1.5, alpha=0.9))
    ax.set_xlabel("key j")
    ax.set_ylabel("query i")
    win = f"window_size=({left}, {right})" + (" (causal)" if causal else "")
    ax.set_title(f"Sq={seqlen_q}, Sk={seqlen_k}, {win}, {alignment.replace('_', '-')}\n"
                 f"tiles {block_m}x{block_n}: green full, orange masked, grey skipped", fontsize=9)
    fig = fig or ax.figure
    if path:
        fig.savefig(path, dpi=100, bbox_inches="tight")
    return MaskPicture(fig, visible, kinds)


def plot_attention(q, k, *, heads=None, queries=None, causal=False, window_size=(-1, -1), scale=None,
                   layout="bhsd", batch=0, path=None, softcap=0.0, alibi_slopes=None):
    """Attention-weight heatmaps (query rows `queries` x all keys) for the query heads `heads` of batch item
    `batch`, in a grid with one shared colorbar. The weights are rebuilt exactly from the kernels' lse:
    P = exp(score - lse), score = q k^T * scale with the softcap and ALiBi of `fused_attn.attention` (the
    probabilities before any dropout), for the selected rows only, so long sequences need no (S x S) matrix.
    Returns (figure, weights (n_heads, n_queries, Sk) as numpy)."""
    with torch.no_grad():
        q, k = q.detach(), k.detach()
        heads_dim = 1 if layout == "bhsd" else 2
        # lse does not depend on v: a one-column v keeps the kernel run cheap.
        v = torch.zeros(*k.shape[:-1], 1, device=k.device, dtype=k.dtype)
        mods = dict(softcap=softcap, alibi_slopes=alibi_slopes)
        _, lse = attention(q, k, v, causal=causal, window_size=window_size, scale=scale, layout=layout,
                           return_lse=True, **mods)
        probs = attention_probs(q, k, lse, causal=causal, window_size=window_size, scale=scale, layout=layout,
                                queries=queries, **mods)
    heads = list(range(q.shape[heads_dim])) if heads is None else list(heads)
    weights = probs[batch, heads].float().cpu().numpy()
    rows = torch.arange(q.shape[3 - heads_dim])[queries if queries is not None else slice(None)].numpy()
    fig = draw_weights(weights, [f"head {h}" for h in heads], rows, path=path)
    return fig, weights


def _ticks(axis, positions, labels, limit=48):
    """Tick labels (tokens, say) where there are few enough to read."""
    if labels is not None and len(positions) <= limit:
        axis.set_ticks(positions, labels, fontsize=7)


def draw_weights(weights, titles, rows, keys=None, row_labels=None, key_labels=None, path=None):
    """Heatmaps of attention weights (n, n_rows, n_keys) in a grid, one shared color scale and colorbar. rows / keys:
    the query / key positions of the rows and columns (keys default 0..n_keys-1), labelled with row_labels /
    key_labels (e.g. the tokens) when given. Returns the figure."""
    weights = np.asarray(weights)
    rows = np.asarray(rows)
    keys = np.arange(weights.shape[2]) if keys is None else np.asarray(keys)
    cols = min(4, len(titles))
    nrows = -(-len(titles) // cols)
    big = len(titles) == 1 and row_labels is not None
    size = (max(6.0, 0.28 * len(keys) + 2), max(3.0, 0.28 * len(rows) + 1.5)) if big else (3.2 * cols + 1,
                                                                                           3.2 * nrows)
    fig, axes = plt.subplots(nrows, cols, figsize=size, squeeze=False)
    vmax = float(weights.max()) if weights.size else 1.0
    for idx, ax in enumerate(axes.flat):
        if idx >= len(titles):
            ax.axis("off")
            continue
        im = ax.imshow(weights[idx], cmap="viridis", vmin=0, vmax=vmax, aspect="auto", interpolation="nearest",
                       extent=(keys[0] - 0.5, keys[-1] + 0.5, rows[-1] + 0.5, rows[0] - 0.5))
        ax.set_title(titles[idx], fontsize=9)
        _ticks(ax.xaxis, keys, key_labels)
        _ticks(ax.yaxis, rows, row_labels)
        if key_labels is not None and len(keys) <= 48:
            plt.setp(ax.get_xticklabels(), rotation=90)
        if idx // cols == nrows - 1:
            ax.set_xlabel("key")
        if idx % cols == 0:
            ax.set_ylabel("query")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="attention weight")
    if path:
        fig.savefig(path, dpi=100, bbox_inches="tight")
    return fig
