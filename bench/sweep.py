"""The sweep (docs/benchmarks.md): sequence length at a fixed token count and hidden size, head dims, masks,
GQA, modes; and exact FLOP counts from the mask's visible pairs."""
from dataclasses import asdict, dataclass

from fused_attn.mask import visible_pairs

SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
HEAD_DIMS = (64, 128, 256)
MASKS = ("none", "causal", "window256", "window1024", "window4096")
MODES = ("fwd", "bwd", "fwd+bwd")
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
# Extra rows with a score modifier or dropout: D = 128, causal, these lengths, to compare with the same case without.
MODIFIERS = ("softcap", "alibi", "dropout")
MODIFIER_SEQLENS = (4096, 16384)
SOFTCAP = 50.0  # Gemma 2's
DROPOUT = 0.1


@dataclass(frozen=True)
class Config:
    seqlen: int
    head_dim: int
    mask: str  # "none", "causal", "window<W>" (causal sliding window of W keys: window_size=(W - 1, 0))
    mode: str
    batch: int
    heads_q: int
    heads_kv: int
    dtype: str = "bf16"
    modifier: str = "none"  # "none", "softcap", "alibi", "dropout"

    @property
    def causal(self) -> bool:
        return self.mask != "none"

    @property
    def window(self):
        """The fused_attn window_size; Mistral's sliding_window=W is (W - 1, 0)."""
        if self.mask.startswith("window"):
            return (int(self.mask[len("window"):]) - 1, 0)
        return (-1, 0) if self.causal else (-1, -1)

    @property
    def gqa(self) -> bool:
        return self.heads_kv != self.heads_q

    def modifier_kwargs(self, device) -> dict:
        """fused_attn.attention's keyword arguments for the modifier (FLOPs are counted as without it)."""
        from fused_attn.reference import alibi_slopes
        return {"none": {}, "softcap": dict(softcap=SOFTCAP), "dropout": dict(dropout_p=DROPOUT),
                "alibi": dict(alibi_slopes=alibi_slopes(self.heads_q, device=device))}[self.modifier]

    def flops(self) -> float:
        """4 * B * Hq * D * visible pairs for the forward (2 * (D + Dv) with Dv = D), x2.5 bwd, x3.5 fwd+bwd."""
        pairs = visible_pairs(self.seqlen, self.seqlen, *self.window)
        return 4.0 * self.batch * self.heads_q * self.head_dim * pairs * MODE_FLOP_FACTOR[self.mode]

    def as_dict(self) -> dict:
        return dict(asdict(self), causal=self.causal, window=list(self.window))


def build(seqlens=SEQLENS, head_dims=HEAD_DIMS, masks=MASKS, modes=MODES, gqa_ratio=8, tokens=16384,
          hidden=2048, dtype="bf16", gqa_only=False, modifiers=MODIFIERS):
    """Configs at `tokens` tokens per batch (B = tokens // S) and `hidden` = H * D; with gqa_ratio > 1, each case
    also appears with Hkv = Hq // gqa_ratio (where Hq allows it). Each of `modifiers` adds the MHA causal D = 128
    cases at MODIFIER_SEQLENS (where the sweep has them) once more with that modifier."""
    configs = []
    for d in head_dims:
        heads = hidden // d
        kv_options = ([] if gqa_only else [heads]) + ([heads // gqa_ratio] if gqa_ratio > 1 and heads % gqa_ratio == 0
                                                      and heads >= gqa_ratio else [])
        for s in seqlens:
            batch = max(1, tokens // s)
            for mask in masks:
                if mask.startswith("window") and int(mask[len("window"):]) >= s:
                    continue  # a window as long as the sequence is the causal case
                for hkv in kv_options:
                    for mode in modes:
                        configs.append(Config(s, d, mask, mode, batch, heads, hkv, dtype))
    configs += [Config(c.seqlen, c.head_dim, c.mask, c.mode, c.batch, c.heads_q, c.heads_kv, dtype, m)
                for m in modifiers for c in list(configs)
                if c.head_dim == 128 and c.mask == "causal" and not c.gqa and c.seqlen in MODIFIER_SEQLENS]
    return configs
