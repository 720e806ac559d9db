"""PNG plots from result rows: TF/s vs sequence length (one line per provider, one panel per mask x mode, one
figure per head dim and GQA setting) and time vs window size for the sliding windows."""
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

MODES = ("fwd", "bwd", "fwd+bwd")


def _mask_order(mask):
    return (0, 0) if mask == "none" else (1, 0) if mask == "causal" else (2, _window(mask))


def _window(mask):
    return int(mask[len("window"):])


def _panel(r):
    """A panel per mask, and per mask + modifier for the modifier rows."""
    modifier = r.get("modifier", "none")
    return r["mask"] if modifier == "none" else f"{r['mask']}+{modifier}"


def _panel_order(panel):
    mask, _, modifier = panel.partition("+")
    return _mask_order(mask), modifier


def _ok(rows):
    return [r for r in rows if r.get("status") == "ok" and r.get("tflops")]


def _grid(rows, panel_rows, panel_key, x, y, xlabel, ylabel, title, path):
    """Panels (one row per value of panel_key, one column per mode), a line per provider of y against x."""
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(len(panel_rows), len(modes), figsize=(4.2 * len(modes), 3.2 * len(panel_rows)),
                             squeeze=False)
    for i, value in enumerate(panel_rows):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            lines = defaultdict(list)
            for r in rows:
                if panel_key(r) == value and r["mode"] == mode:
                    lines[r["provider"]].append((x(r), y(r)))
            for provider, pts in sorted(lines.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
            ax.set_xscale("log", base=2)
            ax.set_ylim(bottom=0)
            ax.set_title(f"{value}, {mode}", fontsize=10)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if lines:
                ax.legend(fontsize=7)
    r = rows[0]
    fig.suptitle(f"{title} -- {r.get('gpu', '?')}, torch {r.get('torch', '?')}, triton {r.get('triton', '?')}, "
                 f"commit {r.get('commit', '?')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_all(rows, folder):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = _ok(rows)
    paths = []
    groups = defaultdict(list)
    for r in rows:
        groups[(r["head_dim"], r["heads_q"], r["heads_kv"])].append(r)
    for (d, hq, hkv), rs in sorted(groups.items()):
        panels = sorted({_panel(r) for r in rs}, key=_panel_order)
        paths.append(_grid(rs, panels, _panel, lambda r: r["seqlen"], lambda r: r["tflops"],
                           "sequence length", "TF/s", f"D={d}, Hq={hq}, Hkv={hkv}",
                           folder / f"throughput_d{d}_h{hq}-{hkv}.png"))
    windows = [r for r in rows if r["mask"].startswith("window") and r["heads_q"] == r["heads_kv"]
               and r.get("modifier", "none") == "none"]
    for d in sorted({r["head_dim"] for r in windows}):
        rs = [r for r in windows if r["head_dim"] == d]
        seqlens = sorted({r["seqlen"] for r in rs})
        paths.append(_grid(rs, [f"S={s}" for s in seqlens], lambda r: f"S={r['seqlen']}",
                           lambda r: _window(r["mask"]), lambda r: r["ms"], "window (keys)", "ms",
                           f"sliding window, D={d}", folder / f"windows_d{d}.png"))
    return paths
