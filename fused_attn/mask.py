"""The mask, in PyTorch, for the reference, the bench's FLOP counts and the plots (the kernels' twin is
fused_attn/kernels/common.py `_visible`).

Query row i sees key column j iff  lo(i) <= j <= hi(i)  with

    lo(i) = i + offset - left,   hi(i) = i + offset + right,   (left / right = -1: unbounded)

offset = Sk - Sq ("bottom_right", FlashAttention-2's convention) or 0 ("top_left", PyTorch SDPA's is_causal).
"""
import torch

ALIGNMENTS = ("bottom_right", "top_left")


def window_bounds(causal: bool, window_size) -> tuple:
    """(left, right) from the public arguments; causal means right = 0."""
    left, right = window_size
    return left, 0 if causal else right


def diagonal_offset(seqlen_q: int, seqlen_k: int, alignment: str = "bottom_right") -> int:
    if alignment not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")
    return seqlen_k - seqlen_q if alignment == "bottom_right" else 0


def row_bounds(seqlen_q: int, seqlen_k: int, left: int, right: int, offset: int, device=None):
    """Per query row, the first and last visible key column (clipped to [0, Sk - 1]; lo > hi: no key)."""
    i = torch.arange(seqlen_q, device=device, dtype=torch.int64)
    lo = (i + offset - left).clamp(min=0) if left >= 0 else torch.zeros_like(i)
    hi = (i + offset + right).clamp(max=seqlen_k - 1) if right >= 0 else torch.full_like(i, seqlen_k - 1)
    return lo, hi


def visible_mask(seqlen_q: int, seqlen_k: int, left: int = -1, right: int = -1, offset: int = None,
                 device=None) -> torch.Tensor:
    """Boolean (Sq, Sk) mask, True where query row i sees key column j. offset defaults to bottom-right."""
    if offset is None:
        offset = seqlen_k - seqlen_q
    return visible_rows(torch.arange(seqlen_q, device=device), seqlen_k, left, right, offset)


def visible_rows(rows: torch.Tensor, seqlen_k: int, left: int, right: int, offset: int) -> torch.Tensor:
    """The mask of the query rows `rows` (a 1-D index tensor): (len(rows), Sk) bool."""
    i, j = rows[:, None].long(), torch.arange(seqlen_k, device=rows.device)[None, :]
    ok = torch.ones(len(rows), seqlen_k, dtype=torch.bool, device=rows.device)
    if left >= 0:
        ok = ok & (j >= i + offset - left)
    if right >= 0:
        ok = ok & (j <= i + offset + right)
    return ok


def visible_pairs(seqlen_q: int, seqlen_k: int, left: int = -1, right: int = -1, offset: int = None) -> int:
    """Exact number of visible (i, j) pairs, in O(Sq) memory (for FLOP counts at long sequence lengths)."""
    if offset is None:
        offset = seqlen_k - seqlen_q
    lo, hi = row_bounds(seqlen_q, seqlen_k, left, right, offset)
    return int((hi - lo + 1).clamp(min=0).sum())
