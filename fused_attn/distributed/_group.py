"""Process-group helpers shared by ring, Ulysses and the sharding functions: rank and size, peers by group rank,
and the argument agreement that makes every rank raise the same error instead of some of them hanging."""
from collections import Counter

import torch
import torch.distributed as dist

from .._args import check_modifiers, kernel_args

exchanges = Counter()  # point-to-point exchanges started, per purpose (the tests read it, as kernels.launches)


def rank_and_size(group):
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed is not initialized: call torch.distributed.init_process_group first "
                           "(torchrun sets up its environment)")
    return dist.get_rank(group), dist.get_world_size(group)


def agree(group, what: str, check):
    """Run check() on every rank -- this rank's own argument checks, raising ValueError / TypeError, returning a
    dict of facts that must be equal on every rank (shapes, dtype, flags) -- and compare the outcomes across the
    group with one small all-gather. A failure anywhere is raised on every rank (one message, naming the rank it
    came from), so no rank goes on to a collective that the others will never join. Returns check()'s facts."""
    facts, error = None, None
    try:
        facts = check()
    except (ValueError, TypeError) as e:
        error = (type(e).__name__, str(e))
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (facts, error), group=group)
    for r, (_, err) in enumerate(gathered):
        if err is not None:
            raise (TypeError if err[0] == "TypeError" else ValueError)(f"{what}: rank {r}: {err[1]}")
    for key, value in facts.items():
        values = [f[key] for f, _ in gathered]
        if any(x != value for x in values):
            raise ValueError(f"{what} needs the same {key} on every rank, got " +
                             ", ".join(f"rank {r}: {x}" for r, x in enumerate(values)))
    return facts


def check_shards(q, k, v, *, causal, window_size, scale, layout, softcap, alibi_slopes):
    """This rank's checks for ring / Ulysses attention: (Args of `attention`, Modifiers, the facts that must agree
    across ranks)."""
    a = kernel_args(q, k, v, causal=causal, window_size=window_size, scale=scale, layout=layout)
    mods = check_modifiers(a.q.shape[0], a.q.shape[1], a.q.device, softcap=softcap, alibi_slopes=alibi_slopes)
    if a.q.shape[2] != a.k.shape[2]:
        raise ValueError(f"q and k/v shards must have one length, got {a.q.shape[2]} and {a.k.shape[2]}")
    facts = {"layout": layout, "window (left, right)": (a.left, a.right), "scale": a.scale, "softcap": mods.softcap,
             "alibi_slopes": None if mods.alibi_slopes is None else tuple(mods.alibi_slopes.shape),
             "dtype": str(a.q.dtype),
             "shard length": a.q.shape[2], "q shape (B, H, S, D)": tuple(a.q.shape),
             "k shape (B, H, S, D)": tuple(a.k.shape), "v shape (B, H, S, D)": tuple(a.v.shape)}
    return a, mods, facts


class Pending:
    """A tensor on its way from another rank: wait() returns it once it has arrived (and this rank's send left)."""

    def __init__(self, recv, works):
        self.recv, self.works = recv, works

    def wait(self):
        for w in self.works:
            w.wait()
        return self.recv


TAGS = {"kv": 0, "dkv": 1, "dkv home": 2}  # distinct tags: exchanges of different purposes may overlap


def exchange(send, group, dst: int, src: int, purpose: str) -> Pending:
    """Start sending `send` to group rank dst and receiving a tensor of its shape and dtype from group rank src."""
    exchanges[purpose] += 1
    recv = torch.empty_like(send)
    ops = [dist.P2POp(dist.isend, send, group=group, group_peer=dst, tag=TAGS[purpose]),
           dist.P2POp(dist.irecv, recv, group=group, group_peer=src, tag=TAGS[purpose])]
    return Pending(recv, dist.batch_isend_irecv(ops))
