"""Megatron's zigzag context-parallel layout and small communication helpers.

``megatron.core.utils.get_batch_on_this_cp_rank`` cuts the sequence into 2P
chunks and gives rank r chunks r and 2P-1-r (in that order), so that every
rank holds the same amount of causal attention work.  Everything in this
package assumes that layout for the local sequence of a rank.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.distributed as dist

__all__ = ["zigzag_chunks", "zigzag_slice", "zigzag_unslice", "p2p", "wait_all", "h2d"]


def zigzag_chunks(rank: int, cp_size: int) -> Tuple[int, int]:
    """Global chunk ids held by ``rank``: (rank, 2P-1-rank)."""
    return rank, 2 * cp_size - 1 - rank


def zigzag_slice(x: torch.Tensor, dim: int, rank: int, cp_size: int) -> torch.Tensor:
    """The local part of a whole-sequence tensor (as get_batch_on_this_cp_rank)."""
    chunks = x.chunk(2 * cp_size, dim=dim)
    lo, hi = zigzag_chunks(rank, cp_size)
    return torch.cat([chunks[lo], chunks[hi]], dim=dim)


def zigzag_unslice(parts: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    """Inverse of ``zigzag_slice`` given every rank's local part, rank order."""
    P = len(parts)
    chunks: List[torch.Tensor] = [None] * (2 * P)  # type: ignore[list-item]
    for r, part in enumerate(parts):
        lo, hi = zigzag_chunks(r, P)
        chunks[lo], chunks[hi] = part.chunk(2, dim=dim)
    return torch.cat(chunks, dim=dim)


def p2p(ops: List[Tuple[str, torch.Tensor, int, int]], group) -> list:
    """Post point-to-point ops [(\"send\"|\"recv\", tensor, group_peer, tag)].

    NCCL wants its sends and receives batched (one group call, so that a ring
    of sends cannot deadlock); gloo takes them one by one, and honours tags,
    which keeps two messages between the same pair of ranks apart.
    Peers are ranks within ``group``.  Returns the requests to wait on.
    """
    if not ops:
        return []
    to_global = lambda p: dist.get_global_rank(group, p)  # noqa: E731
    if dist.get_backend(group) == "nccl":
        p2p_ops = [
            dist.P2POp(dist.isend if kind == "send" else dist.irecv, t, to_global(peer), group, tag)
            for kind, t, peer, tag in ops
        ]
        return dist.batch_isend_irecv(p2p_ops)
    reqs = []
    for kind, t, peer, tag in ops:
        fn = dist.isend if kind == "send" else dist.irecv
        reqs.append(fn(t, to_global(peer), group=group, tag=tag))
    return reqs


def wait_all(reqs) -> None:
    for r in reqs:
        r.wait()


def h2d(t: torch.Tensor, device) -> torch.Tensor:
    """A host index tensor on ``device`` without stalling the host.

    A plain ``.to(cuda)`` of pageable memory synchronises the stream, so the
    host would wait for every kernel already queued before it can launch the
    next pair: the GPU then idles while Python plans the next step, and the
    ring's communication no longer hides behind compute.  Pinned memory
    copies asynchronously (PyTorch's pinned allocator keeps the buffer alive
    until the copy has run)."""
    if torch.device(device).type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)
