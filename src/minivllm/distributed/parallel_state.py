"""This process's place in the tensor-parallel group, and the collectives the sharded model calls.

Without a group (tp=1, the default) rank is 0 and size 1, and the model never calls into
torch.distributed: the single-GPU path is the plain one.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

_rank, _size = 0, 1


def tp_rank() -> int:
    return _rank


def tp_size() -> int:
    return _size


# How long a rendezvous may take (spawned processes import torch first).
RENDEZVOUS_TIMEOUT_S = 120.0


def make_store(rank: int, size: int, port: int = 0) -> dist.TCPStore:
    """The group's key-value store on 127.0.0.1: rank 0 hosts it (port 0: any free port, read back
    from .port), the others connect to it."""
    return dist.TCPStore("127.0.0.1", port, size, is_master=rank == 0, wait_for_workers=False,
                         timeout=timedelta(seconds=RENDEZVOUS_TIMEOUT_S))


def init_group(rank: int, size: int, store: dist.Store, backend: str, timeout_s: float) -> None:
    """Join the group (blocks until all `size` ranks have). One group per process; collectives
    time out after timeout_s."""
    global _rank, _size
    if dist.is_initialized():
        raise RuntimeError("a tensor-parallel engine is already running in this process: shut it down first")
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timedelta(seconds=timeout_s))
    _rank, _size = rank, size


def destroy_group() -> None:
    global _rank, _size
    if dist.is_initialized():
        dist.destroy_process_group()
    _rank, _size = 0, 1


def shard(n: int, rank: int, size: int, unit: int = 1) -> tuple[int, int]:
    """[start, end) of `rank`'s contiguous share of n items, cut in whole `unit`s (an MXFP4 block
    is 32 values); when the units do not divide evenly the first ranks get one more."""
    if size == 1:
        return 0, n
    base, extra = divmod(n // unit, size)
    start = rank * base + min(rank, extra)
    return start * unit, (start + base + (rank < extra)) * unit


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum the ranks' partial results in place (row-parallel o_proj, experts' down projection)."""
    dist.all_reduce(x)
    return x


def broadcast(x: torch.Tensor) -> torch.Tensor:
    dist.broadcast(x, src=0)
    return x


def gather_vocab(local: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
    """Rank 0 gets the full (T, vocab) logits from each rank's (T, vocab share); others get None.
    Shares may differ by a column, and gather wants equal sizes: pad to the widest (rank 0's)."""
    width = shard(vocab_size, 0, _size)[1]
    padded = F.pad(local, (0, width - local.shape[1])).contiguous()
    parts = [torch.empty_like(padded) for _ in range(_size)] if _rank == 0 else None
    dist.gather(padded, parts, dst=0)
    if parts is None:
        return None
    widths = [end - start for start, end in (shard(vocab_size, r, _size) for r in range(_size))]
    return torch.cat([p[:, :w] for p, w in zip(parts, widths)], dim=1)


def min_over_ranks(n: int, device: torch.device) -> int:
    """The smallest n of all ranks (the KV-cache size every rank can hold); n itself at tp=1."""
    if _size == 1:
        return n
    t = torch.tensor([n], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())
