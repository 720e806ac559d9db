"""Sequence shards for context parallelism. With W ranks a sequence of length S is cut either into W contiguous
runs (rank r keeps run r) or, zigzag, into 2W chunks of which rank r keeps chunks r and 2W - 1 - r: under a causal
mask every rank then does the same work (an early chunk with little to see, a late one with much).

    S = 8 positions, W = 2          contiguous          zigzag
    rank 0                          0 1 2 3             0 1 | 6 7
    rank 1                          4 5 6 7             2 3 | 4 5
"""
import torch
import torch.distributed as dist

from ._group import agree, rank_and_size


def segments(rank: int, world: int, length: int, zigzag: bool):
    """Rank `rank`'s shard of `length` positions as runs (global start, local start, run length), in local order."""
    if zigzag:
        c = length // 2
        return ((rank * c, 0, c), ((2 * world - 1 - rank) * c, c, c))
    return ((rank * length, 0, length),)


def _check_dim(x, dim):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int in [{-x.dim()}, {x.dim()}) for a tensor of shape {tuple(x.shape)}, "
                         f"got {dim!r}")
    return dim % x.dim()


def shard_of(x, dim: int, rank: int, world: int, zigzag: bool = True):
    """The shard that `shard_sequence` gives rank `rank` of `world` (no process group needed)."""
    dim = _check_dim(x, dim)
    parts = 2 * world if zigzag else world
    if x.shape[dim] % parts:
        raise ValueError(f"a sequence of length {x.shape[dim]} (dim {dim}) cannot be cut into {parts} equal "
                         f"{'zigzag chunks' if zigzag else 'shards'} for {world} ranks")
    n = x.shape[dim] // world
    runs = segments(rank, world, n, zigzag)
    if len(runs) == 1:
        return x.narrow(dim, runs[0][0], n)
    return torch.cat([x.narrow(dim, g, m) for g, _, m in runs], dim)


def shard_sequence(x, dim: int, group=None, zigzag: bool = True):
    """This rank's shard of the full sequence x along `dim`: with zigzag (the layout ring_attention(...,
    zigzag=True) takes) chunks r and 2W - 1 - r of 2W, else the r-th contiguous W-th. Needs no communication; every
    rank passes the same full x. Differentiable (a slice; zigzag: two slices concatenated)."""
    rank, world = rank_and_size(group)
    return shard_of(x, dim, rank, world, zigzag)


def assemble(parts, dim: int, zigzag: bool = True):
    """The full sequence from every rank's shard (a list in rank order; no process group needed)."""
    world = len(parts)
    if not zigzag:
        return torch.cat(parts, dim)
    chunks = [None] * (2 * world)
    for r, p in enumerate(parts):
        chunks[r], chunks[2 * world - 1 - r] = p.chunk(2, dim)
    return torch.cat(chunks, dim)


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, rank, world, zigzag):
        ctx.args = (dim, group, rank, world, zigzag)
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x, group=group)
        return assemble(parts, dim, zigzag)

    @staticmethod
    def backward(ctx, grad):
        dim, group, rank, world, zigzag = ctx.args
        grad = grad.contiguous()
        dist.all_reduce(grad, group=group)  # each rank's loss used the whole sequence
        return shard_of(grad, dim, rank, world, zigzag).contiguous(), None, None, None, None, None


def unshard_sequence(x, dim: int, group=None, zigzag: bool = True):
    """The full sequence along `dim` from every rank's shard x (all-gather): the exact inverse of shard_sequence
    with the same zigzag. Every rank must pass a shard of the same shape and dtype (else ValueError on every rank).
    Differentiable: the gradient of a rank's shard sums the gradients every rank's use of the full sequence puts
    on it (torch.distributed.nn.functional.all_gather's convention)."""
    rank, world = rank_and_size(group)

    def check():
        d = _check_dim(x, dim)
        if zigzag and x.shape[d] % 2:
            raise ValueError(f"zigzag shards hold two equal chunks, got a shard of odd length {x.shape[d]} (dim {d})")
        return dict(shape=tuple(x.shape), dtype=str(x.dtype), dim=d, zigzag=zigzag)
    return _Unshard.apply(x, agree(group, "unshard_sequence", check)["dim"], group, rank, world, zigzag)
