"""The attention implementations the benchmark times. Each provider turns (config, q, k, v) into a forward
callable, or raises Unsupported with the reason (reported in the results, never dropped silently)."""
import torch

import fused_attn
from fused_attn.kernels import configs
from fused_attn.mask import visible_mask

from .common import Unsupported, probe

REFERENCE_MAX_SEQLEN = 2048  # the naive reference materializes B * H * S^2 scores
MATH_MAX_SEQLEN = 2048


def _fused(cfg, q, k, v):
    mods = cfg.modifier_kwargs(q.device)
    return lambda: fused_attn.attention(q, k, v, causal=cfg.causal, window_size=cfg.window, **mods)


# fused_attn's kernel paths side by side: the same call under configs.use(...), forward and backward alike (-ws:
# warp-specialized kernels; -persistent: persistent programs, heaviest tiles first, TMA loads on sm_90+).
VARIANTS = {"fused_attn-ptr": dict(tma=False, longest_first=False), "fused_attn-tma": dict(tma=True),
            "fused_attn-lf": dict(tma=False, longest_first=True),
            "fused_attn-tma-lf": dict(tma=True, longest_first=True),
            "fused_attn-ws": dict(warp_specialize=True), "fused_attn-persistent": dict(persistent=True),
            "fused_attn-ws-persistent": dict(warp_specialize=True, persistent=True)}


def _fused_variant(name):
    def make(cfg, q, k, v):
        for flag, what in (("tma", "TMA"), ("warp_specialize", "warp specialization")):
            if VARIANTS[name].get(flag) and not configs.tma_capable(configs.capability(q.device)):
                raise Unsupported(f"{what} needs compute capability 9.0+")
        return _fused(cfg, q, k, v)
    return make


def scoped(name, fn):
    """fn (a forward, or a forward + backward) run under the provider's kernel choice; other providers as they are."""
    if name not in VARIANTS:
        return fn

    def run():
        with configs.use(**VARIANTS[name]):
            return fn()
    return run


def invariant(make):
    """A provider's calls made in the batch-invariant mode (fused_attn.set_batch_invariant_mode, its default split
    size): the mode's cost beside the same provider outside it."""
    def provider(*args):
        fn = make(*args)

        def run():
            with fused_attn.set_batch_invariant_mode():
                return fn()
        return run
    return provider


def _reference(cfg, q, k, v):
    if cfg.seqlen > REFERENCE_MAX_SEQLEN:
        raise Unsupported(f"naive reference only up to S={REFERENCE_MAX_SEQLEN}")
    if cfg.modifier == "dropout":
        raise Unsupported("the reference takes dropout as an explicit mask only")
    mods = cfg.modifier_kwargs(q.device)
    return lambda: fused_attn.reference.attention(q, k, v, causal=cfg.causal, window_size=cfg.window,
                                                  upcast=None, **mods)


def _sdpa(backend_name):
    def make(cfg, q, k, v):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = getattr(SDPBackend, backend_name)
        if backend_name == "MATH" and cfg.seqlen > MATH_MAX_SEQLEN:
            raise Unsupported(f"math backend only up to S={MATH_MAX_SEQLEN}")
        if cfg.modifier in ("softcap", "alibi"):
            raise Unsupported(f"SDPA has no {cfg.modifier}")
        kwargs = dict(enable_gqa=cfg.gqa, dropout_p=cfg.modifier_kwargs(q.device).get("dropout_p", 0.0))
        if cfg.mask.startswith("window"):
            if backend_name in ("FLASH_ATTENTION", "CUDNN_ATTENTION"):
                raise Unsupported("no sliding-window support (needs an arbitrary attn_mask)")
            kwargs["attn_mask"] = visible_mask(cfg.seqlen, cfg.seqlen, *cfg.window, device=q.device)
        else:
            kwargs["is_causal"] = cfg.causal  # Sq == Sk: top-left and bottom-right alignment agree

        def fn():
            with sdpa_kernel([backend]):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)
        return probe(fn)
    return make


_flex_compiled = None


def flex():
    """(compiled flex_attention, create_block_mask), one compiled function for every bench; Unsupported without
    FlexAttention. One compiled kernel per shape and mask: the recompile limit is raised so it never falls back to
    eager."""
    global _flex_compiled
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        raise Unsupported(f"FlexAttention not in this torch: {e}") from None
    if _flex_compiled is None:
        import torch._dynamo
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 1000)
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    return _flex_compiled, create_block_mask


def _score_mod(cfg, device):
    """FlexAttention's score_mod for the config's softcap / ALiBi (None without)."""
    mods = cfg.modifier_kwargs(device)
    if "softcap" in mods:
        cap = mods["softcap"]
        return lambda score, b, h, q_idx, kv_idx: cap * torch.tanh(score / cap)
    if "alibi_slopes" in mods:
        slopes = mods["alibi_slopes"]
        return lambda score, b, h, q_idx, kv_idx: score - slopes[h] * (q_idx - kv_idx).abs()
    if mods:
        raise Unsupported(f"FlexAttention has no {cfg.modifier}")
    return None


def _flex(cfg, q, k, v):
    flex_attention, create_block_mask = flex()
    left = cfg.window[0]
    score_mod = _score_mod(cfg, q.device)

    def mask_mod(b, h, q_idx, kv_idx):
        ok = q_idx >= kv_idx
        return ok & (q_idx - kv_idx <= left) if left >= 0 else ok

    block_mask = None
    if cfg.causal:
        block_mask = create_block_mask(mask_mod, None, None, cfg.seqlen, cfg.seqlen, device=q.device)
    return lambda: flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=cfg.gqa)


PROVIDERS = {
    "fused_attn": _fused,
    **{name: _fused_variant(name) for name in VARIANTS},
    "fused_attn-invariant": invariant(_fused),
    "sdpa-flash": _sdpa("FLASH_ATTENTION"),
    "sdpa-cudnn": _sdpa("CUDNN_ATTENTION"),
    "sdpa-efficient": _sdpa("EFFICIENT_ATTENTION"),
    "sdpa-math": _sdpa("MATH"),
    "flex": _flex,
    "reference": _reference,
}
