"""Triton kernels and their launchers (installed as fused_attn.kernels). No autograd, no argument policy."""
from .backward import attention_backward
from .decode import attention_decode, wants_split
from .configs import interpreter_active
from .forward import attention_forward, launches

__all__ = ["attention_forward", "attention_backward", "attention_decode", "wants_split", "interpreter_active",
           "launches"]
