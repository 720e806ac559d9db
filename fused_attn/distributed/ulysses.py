"""Ulysses (DeepSpeed-Ulysses) context parallelism: an all-to-all turns sequence shards into head shards, each rank
runs `attention` on the whole sequence for its heads, and an all-to-all turns the output back into sequence
shards. Four all-to-alls per forward (q, k, v, out), four per backward."""
import torch
import torch.distributed as dist

from ..function import attention
from ._group import agree, check_shards, rank_and_size


class _AllToAll(torch.autograd.Function):
    """Cut x into W chunks along `scatter`, send chunk j to rank j, and concatenate what arrives along `gather` (in
    rank order). Its gradient is the same exchange with the two dims swapped."""

    @staticmethod
    def forward(ctx, x, scatter: int, gather: int, group, world: int):
        ctx.args = (scatter, gather, group, world)
        chunks = torch.stack(x.chunk(world, scatter)).contiguous()  # (W, ...) with chunk j for rank j
        received = torch.empty_like(chunks)
        dist.all_to_all_single(received, chunks, group=group)
        return torch.cat(received.unbind(0), gather)

    @staticmethod
    def backward(ctx, grad):
        scatter, gather, group, world = ctx.args
        return _AllToAll.apply(grad, gather, scatter, group, world), None, None, None, None


def ulysses_attention(q, k, v, *, causal=False, window_size=(-1, -1), scale=None, group=None, layout="bhsd",
                      return_lse=False, softcap=0.0, alibi_slopes=None):
    """Attention over a sequence sharded contiguously across the ranks of `group`, equal to `fused_attn.attention`
    on the whole sequence: rank r holds positions [r * S_shard, (r + 1) * S_shard) of q, k and v (shapes as in
    `ring_attention`, all ranks the same). Two all-to-alls give each rank Hq / W query heads of the whole sequence,
    it runs `attention` on them (causal, window_size, scale as there, on the whole sequence), and an all-to-all
    returns this rank's out shard (and, with return_lse, its lse (B, Hq, S_shard) float32). softcap and
    alibi_slopes as in `attention` (the same slopes on every rank; each rank uses its heads' ones).

    Needs Hq % W == 0. K/V heads: Hkv % W == 0 (each rank gets Hkv / W of them), or, for GQA with fewer kv heads
    than ranks, W % Hkv == 0 (each kv head is sent to the W / Hkv ranks whose query heads read it). Anything
    else raises ValueError on every rank, as do shards, dtypes or flags that differ between ranks.
    """
    rank, world = rank_and_size(group)
    checked = {}

    def check():
        a, mods, facts = checked["args"] = check_shards(q, k, v, causal=causal, window_size=window_size, scale=scale,
                                                         layout=layout, softcap=softcap, alibi_slopes=alibi_slopes)
        Hq, Hkv = a.q.shape[1], a.k.shape[1]
        if Hq % world:
            raise ValueError(f"Ulysses needs the query heads divisible by the world size, got Hq = {Hq} on "
                             f"{world} ranks")
        if Hkv % world and world % Hkv:
            raise ValueError(f"Ulysses needs the kv heads divisible by the world size or dividing it, got "
                             f"Hkv = {Hkv} on {world} ranks")
        return facts
    agree(group, "ulysses_attention", check)
    a, mods, _ = checked["args"]
    slopes = mods.alibi_slopes
    if slopes is not None:  # this rank's query heads
        slopes = slopes.chunk(world, dim=-1)[rank].contiguous()
    heads, seq = (1, 2) if layout == "bhsd" else (2, 1)
    to_heads = (lambda t: _AllToAll.apply(t, heads, seq, group, world))
    Hkv = a.k.shape[1]
    k, v = (t if Hkv % world == 0 else t.repeat_interleave(world // Hkv, dim=heads) for t in (k, v))
    out, lse = attention(to_heads(q), to_heads(k), to_heads(v), causal=causal, window_size=window_size,
                         scale=a.scale, layout=layout, return_lse=True, softcap=mods.softcap, alibi_slopes=slopes)
    out = _AllToAll.apply(out, seq, heads, group, world)
    if not return_lse:
        return out
    return out, _AllToAll.apply(lse, 2, 1, group, world)
