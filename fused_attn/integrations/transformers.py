"""Hugging Face transformers: `register()` adds an attention implementation named "fused_attn", so

    fused_attn.integrations.transformers.register()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="fused_attn")

runs the Triton kernels for causal (bottom-right aligned, so decoding with a KV cache is exact too), GQA
(k / v are not repeated) and Mistral-style sliding windows (HF's sliding_window=W is window_size=(W - 1, 0)).

What goes to the kernels and what does not: the registered mask function returns no mask when the keys carry
no padding and the queries are the last positions of the keys (training, prefill, decoding with a dynamic
cache); the attention function then runs fused_attn. Any other case gets transformers' SDPA mask (4-D boolean,
e.g. left / right padding, packed sequences, static caches) and is computed by transformers' own SDPA attention
(`sdpa_attention_forward`) with that mask -- the documented fallback, logged on the "fused_attn" logger at DEBUG.
Training with attention dropout also falls back; softcap is refused (NotImplementedError).
"""
import logging

import torch

from ..function import attention

NAME = "fused_attn"
log = logging.getLogger("fused_attn")


def fused_attn_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None,
                    allow_is_causal_skip=True, **kwargs):
    """transformers mask function: None where the kernels' own causal / window mask is exact, else sdpa_mask."""
    from transformers.masking_utils import sdpa_mask
    padding_free = attention_mask is None or bool(attention_mask[:, kv_offset:kv_offset + kv_length].all())
    aligned = not isinstance(q_offset, torch.Tensor) and q_offset + q_length == kv_offset + kv_length
    if allow_is_causal_skip and padding_free and aligned:
        return None
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask=attention_mask,
                     allow_is_causal_skip=False, **kwargs)


def fused_attn_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                       sliding_window=None, softcap=None, **kwargs):
    """transformers attention function: (B, Hq, S, D) query, (B, Hkv, S, D) key / value -> ((B, S, Hq, Dv), None)."""
    if softcap is not None:
        raise NotImplementedError("fused_attn does not implement attention softcap yet")
    if attention_mask is not None or dropout > 0.0:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        log.debug("transformers attention -> transformers SDPA: %s",
                  "a padding / custom mask" if attention_mask is not None else f"dropout={dropout}")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    left = sliding_window - 1 if sliding_window else -1
    out = attention(query, key, value, causal=causal, window_size=(left, 0 if causal else -1), scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def register(name: str = NAME) -> str:
    """Register the attention and mask functions with transformers under `name`; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(name, fused_attn_forward)
    AttentionMaskInterface.register(name, fused_attn_mask)
    return name
