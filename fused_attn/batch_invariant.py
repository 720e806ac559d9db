"""The batch-invariant mode: each query row's bits depend on that row alone (docs/batch-invariance.md).

In the mode every path that computes a row -- the dense forward (training or not), packed sequences, the serving
call and the split-KV decode kernels -- walks the row's keys in the same tiles, cut into splits of a fixed number of
keys at absolute key positions; each split's online softmax starts afresh, and the splits' partial results are
merged one after another in key order by one function (kernels/common.py `_merge_partial`), in registers by the
forward, through fp32 partials by the split-KV combine kernel. Nothing that depends on the batch (its size, the
longest sequence, the SM count, num_splits) enters a row's computation.
"""
import os

# Keys per split in the mode: a multiple of every key tile (<= 128) the kernels take, long enough that a split's
# partial (Dv + 1 floats per row) is a small fraction of its keys' bytes, short enough that a long decode still
# splits across the SMs (FlashInfer and SGLang fix theirs in the same range).
DEFAULT_SPLIT_SIZE = 2048

_state = None  # (enabled, split_size); None until first read: then from FUSED_ATTN_BATCH_INVARIANT


def _check_split_size(split_size) -> int:
    if isinstance(split_size, bool) or not isinstance(split_size, int) or split_size < 16 or split_size % 16:
        raise ValueError(f"split_size must be a positive multiple of 16 (keys per split), got {split_size!r}")
    return split_size


def _current():
    global _state
    if _state is None:
        flag = os.environ.get("FUSED_ATTN_BATCH_INVARIANT", "0").strip().lower()
        if flag not in ("", "0", "1", "false", "true", "off", "on"):
            raise ValueError(f"FUSED_ATTN_BATCH_INVARIANT must be 0 or 1, got {flag!r}")
        _state = (flag in ("1", "true", "on"), DEFAULT_SPLIT_SIZE)
    return _state


class set_batch_invariant_mode:
    """Turn the batch-invariant mode on (or off), now: a function, and a context manager that restores the
    previous mode (and split size) when the block ends, like torch.set_grad_enabled.

        fused_attn.set_batch_invariant_mode()              # on for the rest of the program
        with fused_attn.set_batch_invariant_mode():        # on inside the block
            out = fused_attn.attention(q, k, v, causal=True)
        with fused_attn.set_batch_invariant_mode(split_size=4096): ...

    In the mode each query row's out and lse are a function of that row's query, its visible keys and values in
    key order, the modifiers and `split_size` alone: not of the other sequences in the batch, the row's position
    in a packed batch, how many query rows the call has (prefill, chunked prefill, decode), the cache layout (pages
    of any size, cache_batch_idx / cache_leftpad), num_splits, scheduler_metadata, the SM count, GQA vs MHA with
    repeated keys, or whether the inputs require grad. split_size: keys per split (a multiple of 16; default 2048;
    the key tile then divides it). The environment variable FUSED_ATTN_BATCH_INVARIANT=1 turns the mode on by
    default. Read when a call is made (under torch.compile: when it is traced)."""

    def __init__(self, enabled: bool = True, *, split_size: int = None):
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be True or False, got {enabled!r}")
        global _state
        self._previous = _current()
        size = self._previous[1] if split_size is None else _check_split_size(split_size)
        _state = (enabled, size)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _state
        _state = self._previous
        return False


def is_batch_invariant_mode() -> bool:
    """Whether the batch-invariant mode is on (set_batch_invariant_mode, FUSED_ATTN_BATCH_INVARIANT)."""
    return _current()[0]


def split_keys() -> int:
    """Keys per split where the mode is on, 0 where it is off: what a call carries down to the kernels."""
    enabled, size = _current()
    return size if enabled else 0
