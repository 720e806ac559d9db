"""Context parallelism over torch.distributed: a sequence sharded across ranks, attention equal to
`fused_attn.attention` on the whole sequence. Ring attention (K/V shards travel around the ring, partial results
merged by their log-sum-exps; zigzag shards balance causal work) and Ulysses (all-to-all from sequence shards to
head shards and back)."""
from .ring import RingAttentionFunction, ring_attention
from .sharding import shard_sequence, unshard_sequence
from .ulysses import ulysses_attention

__all__ = ["ring_attention", "ulysses_attention", "shard_sequence", "unshard_sequence", "RingAttentionFunction"]
