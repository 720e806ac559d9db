"""merge_attention: attention over the union of disjoint key sets from the results over each set, by their
log-sum-exps (context parallelism's ring merges its steps with it; the split-KV kernels have their own combine
kernel with the same formula)."""
import torch


def _check_parts(outs, lses):
    if isinstance(outs, torch.Tensor) or isinstance(lses, torch.Tensor):
        raise TypeError("outs and lses must be sequences of tensors (one per key set), not a single tensor")
    outs, lses = list(outs), list(lses)
    if not outs or len(outs) != len(lses):
        raise ValueError(f"need one lse per partial output and at least one part, got {len(outs)} outs and "
                         f"{len(lses)} lses")
    ref = outs[0]
    for i, (o, lse) in enumerate(zip(outs, lses)):
        if not isinstance(o, torch.Tensor) or not isinstance(lse, torch.Tensor):
            raise TypeError(f"part {i}: out and lse must be tensors, got {type(o).__name__}, {type(lse).__name__}")
        if o.dim() != 4 or o.shape != ref.shape:
            raise ValueError(f"part {i}: out must be (B, Hq, Sq, Dv) like part 0 {tuple(ref.shape)}, "
                             f"got {tuple(o.shape)}")
        if o.dtype != ref.dtype or not o.dtype.is_floating_point:
            raise TypeError(f"part {i}: out dtype {o.dtype}, part 0 has {ref.dtype} (one floating dtype for all)")
        if lse.dtype != torch.float32:
            raise TypeError(f"part {i}: lse must be float32, got {lse.dtype}")
        if lse.shape != o.shape[:-1]:
            raise ValueError(f"part {i}: lse must be (B, Hq, Sq) = {tuple(o.shape[:-1])}, got {tuple(lse.shape)}")
        if o.device != ref.device or lse.device != ref.device:
            raise ValueError(f"part {i}: out on {o.device}, lse on {lse.device}, part 0 on {ref.device}")
    return outs, lses


def merge_attention(outs, lses):
    """Attention over the union of disjoint key sets, from the results over each set.

    Args:
        outs: P partial outputs (B, Hq, Sq, Dv), each as `attention(..., return_lse=True)` returns it in the
            "bhsd" layout (any strides), one floating dtype.
        lses: their P log-sum-exps (B, Hq, Sq), float32, natural log; -inf where a row saw no key of that set.

    Returns:
        (out, lse): out (B, Hq, Sq, Dv) in the outs' dtype and lse (B, Hq, Sq) float32 of attention over all the
        keys:

            lse = log sum_p exp(lse_p),        out = sum_p exp(lse_p - lse) * out_p

        computed in fp32, in the parts' order (deterministic). A part whose lse is -inf for a row adds exactly
        nothing to it; a row empty in every part gets out 0 and lse -inf, as `attention` returns it. The lses are
        trusted to be finite or -inf (checking would synchronize a GPU).
    """
    outs, lses = _check_parts(outs, lses)
    stacked = torch.stack(lses)  # (P, B, Hq, Sq)
    lse = torch.logsumexp(stacked, dim=0)  # -inf where every part is -inf
    seen = torch.isfinite(lse)
    weights = torch.where(seen, torch.exp(stacked - torch.where(seen, lse, 0.0)), 0.0)
    out = torch.zeros(outs[0].shape, device=outs[0].device, dtype=torch.float32)
    for w, o in zip(weights, outs):  # where(): an empty part's out is not read (0 * NaN would be NaN)
        out += torch.where(w[..., None] > 0, w[..., None] * o.float(), 0.0)
    return out.to(outs[0].dtype), lse
