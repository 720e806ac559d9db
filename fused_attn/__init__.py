"""fused_attn: FlashAttention-style attention as hand-written Triton kernels for PyTorch."""
from . import reference
from .function import FusedAttentionFunction, attention

__version__ = "0.1.0"
__all__ = ["attention", "FusedAttentionFunction", "reference"]
