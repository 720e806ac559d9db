"""One training step of a causal self-attention layer with context parallelism, to run under torchrun:

    torchrun --nproc-per-node 8 -m fused_attn.distributed.example --cp 4 --scheme ring

8 processes = 2 data-parallel replicas x 4-way context parallelism: each replica has its own batch, and within a
context-parallel group every rank keeps one zigzag shard of the sequence. NCCL on GPUs (one per process), gloo on
the CPU (set TRITON_INTERPRET=1: the kernels then run through the Triton interpreter; small sizes). --check also
runs the step on the whole sequence on every rank and prints the largest difference of the parameter gradients.
"""
import argparse
import os

import torch
import torch.distributed as dist

from . import ring_attention, shard_sequence, ulysses_attention


class Attention(torch.nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int):
        super().__init__()
        self.heads, self.kv_heads, self.d = heads, kv_heads, hidden // heads
        self.qkv = torch.nn.Linear(hidden, (heads + 2 * kv_heads) * self.d, bias=False)
        self.proj = torch.nn.Linear(heads * self.d, hidden, bias=False)

    def forward(self, x, attend):
        """x (B, S, hidden) -> (B, S, hidden); attend(q, k, v) on (B, S, H, D) tensors."""
        B, S = x.shape[:2]
        q, k, v = self.qkv(x).view(B, S, -1, self.d).split([self.heads, self.kv_heads, self.kv_heads], dim=2)
        return self.proj(attend(q, k, v).reshape(B, S, -1))


def step(layer, x, attend):
    """Loss = mean of the squared outputs over the tokens given; returns the parameter gradients averaged over every
    rank (as DDP over the world would): with each rank's loss over its shard, the mean over the whole sequence
    (a sum over the group / cp) and then over the replicas."""
    layer.zero_grad()
    layer(x, attend).float().square().mean().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    for g in grads:
        dist.all_reduce(g)
        g /= dist.get_world_size()
    return grads


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cp", type=int, default=0, help="context-parallel group size (default: every process)")
    p.add_argument("--scheme", choices=("ring", "ulysses"), default="ring")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seqlen", type=int, default=64, help="whole sequence, split over the group")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--check", action="store_true")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    cp = args.cp or world
    if world % cp:
        raise SystemExit(f"--cp {cp} must divide the {world} processes")
    # Every rank creates every group (new_group is collective); ranks [r * cp, (r + 1) * cp) are one replica.
    groups = [dist.new_group(list(range(d * cp, (d + 1) * cp))) for d in range(world // cp)]
    group = groups[rank // cp]
    zigzag = args.scheme == "ring"  # Ulysses takes contiguous shards

    torch.manual_seed(0)  # the same parameters on every rank
    dtype = torch.bfloat16 if cuda else torch.float32
    layer = Attention(args.hidden, args.heads, args.kv_heads).to(device, dtype)
    gen = torch.Generator().manual_seed(1 + rank // cp)  # one batch per replica, the same within its group
    x = torch.randn(args.batch, args.seqlen, args.hidden, generator=gen).to(device, dtype)

    if args.scheme == "ring":
        def attend(q, k, v):
            return ring_attention(q, k, v, causal=True, layout="bshd", zigzag=True, group=group)
    else:
        def attend(q, k, v):
            return ulysses_attention(q, k, v, causal=True, layout="bshd", group=group)
    grads = step(layer, shard_sequence(x, 1, group, zigzag), attend)  # loss over this rank's tokens only
    if args.check:  # the same step without context parallelism (each replica's ranks all compute it)
        from .. import attention
        whole = step(layer, x, lambda q, k, v: attention(q, k, v, causal=True, layout="bshd"))
        err = max((a.float() - b.float()).abs().max().item() for a, b in zip(grads, whole))
        scale = max(b.float().abs().max().item() for b in whole)
        print(f"rank {rank}: {args.scheme} cp={cp} max |grad - grad on the whole sequence| = {err:.2e} "
              f"(largest gradient {scale:.2e})", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
