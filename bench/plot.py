"""PNG plots from result rows: TF/s vs sequence length (one line per provider, one panel per mask x mode, one
figure per head dim and GQA setting) and time vs window size for the sliding windows."""
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

MODES = ("fwd", "bwd", "fwd+bwd")


def _mask_order(mask):
    return (0, 0) if mask == "none" else (1, 0) if mask == "causal" else (2, int(mask[len("window"):]))


def _ok(rows):
    return [r for r in rows if r.get("status") == "ok" and r.get("tflops")]


def _title(rows):
    r = rows[0]
    return f"{r.get('gpu', '?')}, torch {r.get('torch', '?')}, triton {r.get('triton', '?')}, commit {r.get('commit', '?')}"


def plot_throughput(rows, folder: Path):
    """One PNG per (head dim, heads): panels mask x mode, TF/s vs sequence length, a line per provider."""
    groups = defaultdict(list)
    for r in _ok(rows):
        groups[(r["head_dim"], r["heads_q"], r["heads_kv"])].append(r)
    paths = []
    for (d, hq, hkv), rs in sorted(groups.items()):
        masks = sorted({r["mask"] for r in rs}, key=_mask_order)
        modes = [m for m in MODES if any(r["mode"] == m for r in rs)]
        fig, axes = plt.subplots(len(masks), len(modes), figsize=(4.2 * len(modes), 3.2 * len(masks)),
                                 squeeze=False, sharex=True)
        for i, mask in enumerate(masks):
            for j, mode in enumerate(modes):
                ax = axes[i][j]
                lines = defaultdict(list)
                for r in rs:
                    if r["mask"] == mask and r["mode"] == mode:
                        lines[r["provider"]].append((r["seqlen"], r["tflops"]))
                for provider, pts in sorted(lines.items()):
                    pts.sort()
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
                ax.set_xscale("log", base=2)
                ax.set_title(f"{mask}, {mode}", fontsize=10)
                ax.set_ylim(bottom=0)
                ax.grid(alpha=0.3)
                if j == 0:
                    ax.set_ylabel("TF/s")
                if i == len(masks) - 1:
                    ax.set_xlabel("sequence length")
                if lines:
                    ax.legend(fontsize=7)
        fig.suptitle(f"D={d}, Hq={hq}, Hkv={hkv} -- {_title(rs)}", fontsize=10)
        fig.tight_layout()
        path = folder / f"throughput_d{d}_h{hq}-{hkv}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_windows(rows, folder: Path):
    """Time vs window size (causal sliding windows), per head dim, one panel per (sequence length, mode)."""
    rs = [r for r in _ok(rows) if r["mask"].startswith("window") and r["heads_q"] == r["heads_kv"]]
    paths = []
    for d in sorted({r["head_dim"] for r in rs}):
        sub = [r for r in rs if r["head_dim"] == d]
        seqlens = sorted({r["seqlen"] for r in sub})
        modes = [m for m in MODES if any(r["mode"] == m for r in sub)]
        fig, axes = plt.subplots(len(seqlens), len(modes), figsize=(4.2 * len(modes), 3.2 * len(seqlens)),
                                 squeeze=False)
        for i, s in enumerate(seqlens):
            for j, mode in enumerate(modes):
                ax = axes[i][j]
                lines = defaultdict(list)
                for r in sub:
                    if r["seqlen"] == s and r["mode"] == mode:
                        lines[r["provider"]].append((int(r["mask"][len("window"):]), r["ms"]))
                for provider, pts in sorted(lines.items()):
                    pts.sort()
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
                ax.set_xscale("log", base=2)
                ax.set_title(f"S={s}, {mode}", fontsize=10)
                ax.set_xlabel("window (keys)")
                ax.set_ylim(bottom=0)
                ax.set_ylabel("ms")
                ax.grid(alpha=0.3)
                if lines:
                    ax.legend(fontsize=7)
        fig.suptitle(f"sliding window, D={d} -- {_title(sub)}", fontsize=10)
        fig.tight_layout()
        path = folder / f"windows_d{d}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_all(rows, folder: Path):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return plot_throughput(rows, folder) + plot_windows(rows, folder)
