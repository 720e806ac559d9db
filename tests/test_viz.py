"""Mask and attention-weight pictures: rendered to PNG, and the data behind them checked."""
import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

import fused_attn
from fused_attn import viz
from fused_attn.__main__ import main
from fused_attn.mask import visible_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("sq,sk,causal,window,alignment", [
    (48, 64, False, (20, 0), "bottom_right"),
    (40, 24, True, (-1, -1), "top_left"),
    (33, 33, False, (3, 5), "bottom_right"),
])
def test_plot_mask(tmp_path, sq, sk, causal, window, alignment):
    path = tmp_path / "mask.png"
    pic = viz.plot_mask(sq, sk, causal=causal, window_size=window, alignment=alignment, path=path)
    offset = sk - sq if alignment == "bottom_right" else 0
    want = visible_mask(sq, sk, window[0], 0 if causal else window[1], offset).numpy()
    assert pic.visible.shape == (sq, sk)
    assert np.all(pic.visible[~want] == 0) and np.all(pic.visible[want] == 1)
    # Skipped tiles hold no visible cell; full tiles only visible ones.
    for (a, b), kind in np.ndenumerate(pic.tiles):
        cells = want[a * 16:(a + 1) * 16, b * 16:(b + 1) * 16]
        assert (kind == viz.SKIPPED) == (not cells.any()) and (kind == viz.FULL_TILE) <= cells.all()
    img = mpimg.imread(path)
    assert img.shape[0] > 200 and img.shape[1] > 200 and img[..., :3].std() > 0.05


def test_plot_attention_rebuilds_the_weights_from_the_lse(tmp_path):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 70, 32, generator=g).to(DEVICE)
    k = torch.randn(2, 2, 90, 32, generator=g).to(DEVICE)
    fig, w = viz.plot_attention(q, k, heads=[1, 3], queries=slice(10, 40), window_size=(15, 3), batch=1,
                                path=tmp_path / "heads.png")
    _, probs = fused_attn.reference.attention(q, k, k, window_size=(15, 3), return_probs=True,
                                              upcast=torch.float64)
    want = probs[1, [1, 3], 10:40].cpu().numpy()
    assert w.shape == (2, 30, 90) and np.abs(w - want).max() < 1e-5
    assert np.all(w[:, ~visible_mask(70, 90, 15, 3).numpy()[10:40]] == 0)
    assert np.allclose(w.sum(-1), 1, atol=1e-5)
    assert mpimg.imread(tmp_path / "heads.png").shape[1] > 300


def test_plot_attention_with_softcap_and_alibi():
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(1, 2, 40, 16, generator=g).to(DEVICE) * 3 for _ in range(2))
    mods = dict(softcap=1.5, alibi_slopes=torch.tensor([0.3, 0.05], device=DEVICE))
    _, w = viz.plot_attention(q, k, queries=slice(5, 25), causal=True, **mods)
    _, probs = fused_attn.reference.attention(q, k, k, causal=True, return_probs=True, upcast=torch.float64, **mods)
    assert np.abs(w - probs[0, :, 5:25].cpu().numpy()).max() < 1e-5
    _, plain = viz.plot_attention(q, k, queries=slice(5, 25), causal=True)
    assert np.abs(w - plain).max() > 0.05


def test_plot_mask_command(tmp_path, capsys):
    out = tmp_path / "m.png"
    assert main(["plot-mask", "--seqlen-q", "20", "--seqlen-k", "30", "--causal", "--out", str(out)]) == 0
    assert out.exists() and "wrote" in capsys.readouterr().out
