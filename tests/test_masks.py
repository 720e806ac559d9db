"""The mask: the tile ranges the kernels visit (fused_attn/kernels/common.py) against the mask itself (fused_attn/mask.py),
and the reference against PyTorch's own SDPA."""
import math

import pytest
import torch
import triton
import triton.language as tl

import fused_attn
from fused_attn.kernels.common import _block_range
from fused_attn.mask import visible_mask, visible_pairs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.heuristics({"HAS_LEFT": lambda a: a["left"] >= 0, "HAS_RIGHT": lambda a: a["right"] >= 0})
@triton.jit
def _block_range_probe(OUT, n_rows, n_cols, offset, left, right, BLOCK_ROWS: tl.constexpr,
                       BLOCK_COLS: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    pid = tl.program_id(0)
    lo, full_lo, full_hi, hi = _block_range(pid * BLOCK_ROWS, n_rows, n_cols, offset, left, right,
                                            BLOCK_ROWS, BLOCK_COLS, HAS_LEFT, HAS_RIGHT)
    tl.store(OUT + pid * 4 + 0, lo)
    tl.store(OUT + pid * 4 + 1, full_lo)
    tl.store(OUT + pid * 4 + 2, full_hi)
    tl.store(OUT + pid * 4 + 3, hi)


def tile_ranges(n_rows, n_cols, offset, left, right, br, bc):
    n_tiles = triton.cdiv(n_rows, br)
    out = torch.full((n_tiles, 4), -99, dtype=torch.int32, device=DEVICE)
    _block_range_probe[(n_tiles,)](out, n_rows, n_cols, offset, left, right, BLOCK_ROWS=br, BLOCK_COLS=bc)
    return out.cpu().tolist()


WINDOWS = [(-1, -1), (-1, 0), (0, 0), (5, 0), (0, 7), (40, 3), (-1, 9), (13, -1), (500, 500)]
SIZES = [(1, 1), (1, 77), (77, 1), (64, 64), (100, 37), (37, 100), (131, 131)]


@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"win{w[0]},{w[1]}")
@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: f"q{s[0]}k{s[1]}")
@pytest.mark.parametrize("alignment", ["bottom_right", "top_left"])
def test_tile_ranges_cover_exactly_the_visible_tiles(sizes, window, alignment):
    sq, sk = sizes
    offset = sk - sq if alignment == "bottom_right" else 0
    vis = visible_mask(sq, sk, *window, offset)
    # Forward / dQ orientation (query tiles x key tiles) and the transposed one used by dK/dV.
    for rows, cols, mask, off, lr, (br, bc) in [
        (sq, sk, vis, offset, window, (32, 16)),
        (sk, sq, vis.T, -offset, window[::-1], (16, 32)),
    ]:
        for t, (lo, full_lo, full_hi, hi) in enumerate(tile_ranges(rows, cols, off, *lr, br, bc)):
            assert lo % bc == 0 and lo <= full_lo <= full_hi <= hi
            block = mask[t * br:(t + 1) * br]
            seen_tiles = {j // bc for j in block.any(0).nonzero().flatten().tolist()}
            assert seen_tiles == set(range(lo // bc, math.ceil(hi / bc))), (t, lo, hi)
            for c in range(lo, hi, bc):
                tile_full = c + bc <= cols and bool(block[:, c:c + bc].all())
                assert tile_full == (full_lo <= c < full_hi), (t, c, full_lo, full_hi)


@pytest.mark.parametrize("sq,sk", [(1, 9), (9, 1), (40, 40), (23, 57), (57, 23)])
@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"win{w[0]},{w[1]}")
def test_visible_pairs_counts_the_mask(sq, sk, window):
    for offset in (sk - sq, 0, 5):
        assert visible_pairs(sq, sk, *window, offset) == int(visible_mask(sq, sk, *window, offset).sum())


def test_mask_formula_by_hand():
    # Sq = 3, Sk = 5, bottom-right causal: row i sees j <= i + 2.
    want = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(visible_mask(3, 5, -1, 0), want)
    # Mistral sliding_window=3 is window (2, 0): each row sees itself and the two keys before.
    want = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(visible_mask(4, 4, 2, 0), want)


@pytest.mark.parametrize("sq,sk", [(7, 7), (5, 9), (9, 5)])
@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_torch_sdpa(sq, sk, causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, s, 16, generator=g, dtype=torch.float64) for s in (sq, sk, sk))
    # SDPA's is_causal is top-left aligned; rows with no visible key are NaN there, 0 here.
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    got = fused_attn.reference.attention(q, k, v, causal=causal, alignment="top_left", upcast=torch.float64)
    torch.testing.assert_close(got, want)
    if sq <= sk:  # bottom-right = SDPA with an explicit boolean mask
        m = visible_mask(sq, sk, -1, 0 if causal else -1)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)
        got = fused_attn.reference.attention(q, k, v, causal=causal, upcast=torch.float64)
        torch.testing.assert_close(got, want)


def test_reference_window_matches_sdpa_with_a_dense_mask():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 30, 8, generator=g, dtype=torch.float64) for _ in range(3))
    for window in [(3, 0), (2, 5), (-1, 4), (6, -1)]:
        m = visible_mask(30, 30, *window)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)
        got, lse, p = fused_attn.reference.attention(q, k, v, window_size=window, upcast=torch.float64,
                                                     return_lse=True, return_probs=True)
        torch.testing.assert_close(got, want)
        assert torch.all(p[..., ~m] == 0)
        torch.testing.assert_close(lse, torch.logsumexp((q @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(~m, -math.inf), -1))
