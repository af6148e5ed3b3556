"""One-token halo for FoX (Pro)'s key/value token shift under zigzag CP.

k'_t = a_t k_{t-1} + (1 - a_t) k_t needs the token before each local chunk.
Rank r holds chunks r and 2P-1-r:
- chunk r follows chunk r-1, the first chunk of rank r-1 (nothing for r = 0);
- chunk 2P-1-r follows chunk 2P-2-r, which is rank r+1's second chunk, or,
  on the last rank (r = P-1), its own first chunk.
So every rank sends the last token of its first chunk forward (r -> r+1) and
the last token of its second chunk backward (r -> r-1).  Backward sends the
gradients of the received tokens the opposite way.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .layout import p2p, wait_all

__all__ = ["halo_previous_tokens", "shift_tokens_cp"]

_TAG_FWD, _TAG_BWD = 21, 22


def _exchange(to_next, to_prev, group, tag):
    """Send ``to_next`` to r+1 and ``to_prev`` to r-1 (None: nothing to send);
    return (from_prev, from_next) (zeros where no neighbour sends)."""
    P, r = dist.get_world_size(group), dist.get_rank(group)
    like = to_next if to_next is not None else to_prev
    from_prev = torch.zeros_like(like)
    from_next = torch.zeros_like(like)
    ops = []
    if to_next is not None and r + 1 < P:
        ops.append(("send", to_next.contiguous(), r + 1, tag))
    if to_prev is not None and r > 0:
        ops.append(("send", to_prev.contiguous(), r - 1, tag + 100))
    if r > 0:
        ops.append(("recv", from_prev, r - 1, tag))
    if r + 1 < P:
        ops.append(("recv", from_next, r + 1, tag + 100))
    wait_all(p2p(ops, group))
    return from_prev, from_next


class _Halo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, last_lo, last_hi, group):
        P, r = dist.get_world_size(group), dist.get_rank(group)
        ctx.group = group
        from_prev, from_next = _exchange(last_lo.detach(), last_hi.detach(), group, _TAG_FWD)
        prev_lo = from_prev  # zeros on rank 0: chunk 0 starts the sequence
        prev_hi = last_lo.detach().clone() if r == P - 1 else from_next
        return prev_lo, prev_hi

    @staticmethod
    def backward(ctx, d_prev_lo, d_prev_hi):
        group = ctx.group
        P, r = dist.get_world_size(group), dist.get_rank(group)
        # d_prev_lo belongs to rank r-1's last_lo, d_prev_hi to rank r+1's last_hi
        from_prev, from_next = _exchange(
            d_prev_hi.contiguous() if r < P - 1 else torch.zeros_like(d_prev_hi),
            d_prev_lo.contiguous(), group, _TAG_BWD,
        )
        d_last_lo = from_next.clone()  # rank r+1's d_prev_lo
        d_last_hi = from_prev.clone()  # rank r-1's d_prev_hi
        if r == P - 1:
            d_last_lo = d_last_lo + d_prev_hi
        return d_last_lo, d_last_hi, None


def halo_previous_tokens(x: torch.Tensor, group):
    """x: [T_local, ...] (sequence first, two zigzag chunks).  Returns the
    tokens preceding each chunk, (prev_lo, prev_hi), each [...]; zeros before
    the first token of the sequence."""
    Tc = x.shape[0] // 2
    return _Halo.apply(x[Tc - 1], x[-1], group)


def shift_tokens_cp(x: torch.Tensor, gate: torch.Tensor, group, starts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """FoX's token shift x'_t = a_t x_{t-1} + (1 - a_t) x_t on a zigzag-local
    sbhd tensor x [T_local, B, H, D] with gate a [T_local, B, H].  starts:
    optional [T_local, B] bool, True where a document begins (its previous
    token counts as zero, halo included)."""
    Tc = x.shape[0] // 2
    prev_lo, prev_hi = halo_previous_tokens(x, group)
    prev = torch.cat([prev_lo[None], x[: Tc - 1], prev_hi[None], x[Tc:-1]], dim=0)
    if starts is not None:
        prev = prev.masked_fill(starts[:, :, None, None], 0.0)
    a = gate.to(x.dtype).unsqueeze(-1)
    return x + a * (prev - x)
