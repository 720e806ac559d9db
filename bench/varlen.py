"""The packed-batch case (`python -m bench --varlen`): 16k tokens in sequences of mixed lengths, fused_attn's
varlen kernels beside what a user would otherwise run -- SDPA on the padded batch with a key-padding mask,
FlexAttention with a document mask on the packed tokens -- and the dense kernel on the padded batch (its raw
throughput at the same sequences, padding computed). TF/s count the real (unpadded, visible) pairs, except for
"fused_attn-dense-padded", which counts the pairs it computes."""
from dataclasses import asdict, dataclass

import torch

import fused_attn
from fused_attn.mask import visible_pairs
from fused_attn.varlen import cu_seqlens

from . import common
from .common import DTYPES, probe
from .providers import flex
from .sweep import HEAD_DIMS, MODE_FLOP_FACTOR, MODES
# A fixed draw from 128..4096 summing to 16384 tokens.
LENGTHS = (3001, 187, 1290, 4096, 644, 2210, 128, 1555, 903, 2370)


@dataclass(frozen=True)
class Case:
    head_dim: int
    mask: str  # "none" or "causal"
    mode: str
    heads: int
    lengths: tuple = LENGTHS
    dtype: str = "bf16"

    @property
    def causal(self) -> bool:
        return self.mask == "causal"

    def flops(self, padded: bool = False) -> float:
        """4 * Hq * D * visible pairs summed over the sequences (padded: over the padded batch), x mode factor."""
        right = 0 if self.causal else -1
        seqs = [max(self.lengths)] * len(self.lengths) if padded else self.lengths
        pairs = sum(visible_pairs(n, n, -1, right) for n in seqs)
        return 4.0 * self.heads * self.head_dim * pairs * MODE_FLOP_FACTOR[self.mode]

    def as_dict(self) -> dict:
        return dict(asdict(self), lengths=list(self.lengths), seqlen=sum(self.lengths), batch=len(self.lengths),
                    heads_q=self.heads, heads_kv=self.heads, window=[-1, 0 if self.causal else -1])


def build(head_dims, masks, modes, hidden=2048, dtype="bf16"):
    return [Case(d, m, mode, hidden // d, dtype=dtype) for d in head_dims for m in masks for mode in modes]


def build_from(args):
    return build(args.head_dims or HEAD_DIMS, args.masks or ("none", "causal"), args.modes or MODES,
                 args.hidden or 2048, args.dtype)


def packed_inputs(case: Case, device, dtype, requires_grad=False, seed=0):
    """q, k, v (total, H, D) and cu_seqlens for the case's lengths."""
    g = torch.Generator(device=device).manual_seed(seed)
    total = sum(case.lengths)
    q, k, v = (torch.randn(total, case.heads, case.head_dim, device=device, dtype=dtype, generator=g)
               .requires_grad_(requires_grad) for _ in range(3))
    return q, k, v, cu_seqlens(case.lengths, device)


def pad(x, lengths):
    """(total, H, D) packed -> (B, H, max_len, D) zero-padded (a differentiable copy)."""
    parts = x.split(list(lengths))
    return torch.nn.utils.rnn.pad_sequence(parts, batch_first=True).transpose(1, 2)


def unpad(x, lengths):
    """(B, H, max_len, D) -> (total, H, D), the inverse of pad."""
    return torch.cat([x[b, :, :n].transpose(0, 1) for b, n in enumerate(lengths)])


def _varlen(case, q, k, v, cu):
    n = max(case.lengths)
    return lambda: fused_attn.attention_varlen(q, k, v, cu, cu, n, n, causal=case.causal)


def _dense_padded(case, q, k, v, cu):
    """The dense kernel on the padded batch: no key-padding mask, so padded keys are attended -- a throughput
    yardstick only (its rows of the real tokens are not the varlen result)."""
    qp, kp, vp = (pad(t, case.lengths) for t in (q, k, v))
    return lambda: unpad(fused_attn.attention(qp, kp, vp, causal=case.causal), case.lengths)


def _sdpa_padded(backend_name):
    def make(case, q, k, v, cu):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        lengths = torch.tensor(case.lengths, device=q.device)
        n = max(case.lengths)
        j = torch.arange(n, device=q.device)
        keep = j[None, None, None, :] < lengths[:, None, None, None]  # (B, 1, 1, S) key padding
        if case.causal:
            keep = keep & (j[None, None, :, None] >= j[None, None, None, :])
        # Padded query rows see key 0 (they are dropped anyway), so no row is empty and nothing is NaN.
        keep = keep | (j[None, None, None, :] == 0)
        backend = getattr(SDPBackend, backend_name)

        def fn():
            qp, kp, vp = (pad(t, case.lengths) for t in (q, k, v))
            with sdpa_kernel([backend]):
                out = torch.nn.functional.scaled_dot_product_attention(qp, kp, vp, attn_mask=keep)
            return unpad(out, case.lengths)
        return probe(fn)
    return make


def _flex_document(case, q, k, v, cu):
    flex_attention, create_block_mask = flex()
    total = sum(case.lengths)
    doc = torch.repeat_interleave(torch.arange(len(case.lengths), device=q.device),
                                  torch.tensor(case.lengths, device=q.device))

    def mask_mod(b, h, q_idx, kv_idx):
        same = doc[q_idx] == doc[kv_idx]
        return same & (q_idx >= kv_idx) if case.causal else same

    block_mask = create_block_mask(mask_mod, None, None, total, total, device=q.device)
    view = (lambda t: t.transpose(0, 1)[None])  # (1, H, total, D)
    return lambda: flex_attention(view(q), view(k), view(v), block_mask=block_mask)[0].transpose(0, 1)


PROVIDERS = {
    "fused_attn-varlen": _varlen,
    "fused_attn-dense-padded": _dense_padded,
    "sdpa-efficient-padded": _sdpa_padded("EFFICIENT_ATTENTION"),
    "sdpa-cudnn-padded": _sdpa_padded("CUDNN_ATTENTION"),
    "sdpa-flash-padded": _sdpa_padded("FLASH_ATTENTION"),
    "flex-document": _flex_document,
}


def check(name, case, device, cache):
    """The provider on a small packed batch of the same kind against the float64 reference run sequence by
    sequence (common.check); the padded dense yardstick on the rows of its longest sequence only (the others attend
    padding). Cached per (provider, head dim, mask)."""
    small = Case(case.head_dim, case.mask, "fwd", 2, lengths=(150, 37, 200, 1), dtype=case.dtype)
    q, k, v, cu = packed_inputs(small, device, DTYPES[case.dtype])
    rows = slice(None)
    if name == "fused_attn-dense-padded":
        b = small.lengths.index(max(small.lengths))
        rows = slice(sum(small.lengths[:b]), sum(small.lengths[:b + 1]))
    return common.check(cache, (name, case.head_dim, case.mask), lambda: PROVIDERS[name](small, q, k, v, cu)()[rows],
                        lambda upcast: fused_attn.reference.attention_varlen(q, k, v, cu, cu, causal=small.causal,
                                                                             upcast=upcast)[rows])


def measure(name, case, device):
    return common.measure(PROVIDERS[name], case, packed_inputs(case, device, DTYPES[case.dtype],
                                                               requires_grad=case.mode != "fwd"))


def derived(case, name, ms) -> dict:
    """TF/s of the real pairs (the padded yardstick: of the pairs it computes)."""
    return {"tflops": case.flops(padded=name == "fused_attn-dense-padded") / (ms * 1e-3) / 1e12}


def label(case) -> str:
    return f"varlen D={case.head_dim:3} H={case.heads} {case.mask:6} {case.mode:8}"


def describe(case) -> str:
    return (f"{label(case)} {len(case.lengths)} seqs {sum(case.lengths)} tokens {case.flops() / 1e12:9.3f} TFLOP "
            f"real pairs")
