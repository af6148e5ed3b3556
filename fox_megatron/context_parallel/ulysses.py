"""Ulysses context parallelism: all-to-all from sequence shards to head shards.

Each rank trades its sequence slice of all heads for the whole sequence of
H/P heads (DeepSpeed-Ulysses, Jacobs et al. 2023), runs ordinary forgetting
attention -- ACP included, unchanged, since every rank sees whole sequences --
and trades back.  With DeepSpeed installed the q/k/v/output exchange is
DeepSpeed's ``DistributedAttention`` (deepspeed.sequence.layer); without it, the
same all-to-all is done here with torch.distributed.all_to_all_single.  The
log forget gates always go through the local all-to-all: DeepSpeed's
interface only moves q, k and v.

The gathered sequence arrives in rank order, i.e. in zigzag chunk order
(0, 2P-1, 1, 2P-2, ...); it is put into natural order before attention and
back after.

Load balance under ACP.  A rank's attention time follows how much of the
matrix its heads keep, and heads differ by orders of magnitude (a head that
forgets within a few hundred tokens keeps a thin band, a slow head keeps
nearly everything).  Handing out heads in index order can give one rank all
the slow heads, and the step waits for it.  With ACP on, every rank sums its
log forget gates per head, one all-reduce of H numbers makes the sums global,
and the key/value head groups are dealt to ranks in "snake" order of their
predicted work (1 / forgetting rate, largest first): the same permutation on
every rank, undone on the output.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.distributed as dist

from fox_megatron.kernels import AcpConfig, forgetting_attention

from .documents import longest_document
from .layout import zigzag_chunks

__all__ = ["ulysses_attention", "deepspeed_available"]


@functools.lru_cache(maxsize=None)
def deepspeed_available() -> bool:
    try:
        from deepspeed.sequence.layer import DistributedAttention  # noqa: F401
    except Exception:  # ImportError, or a broken optional dependency
        return False
    return True


def _seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """[T_local, B, H, ...] -> [P * T_local, B, H / P, ...] (rank-ordered)."""
    P = dist.get_world_size(group)
    T, B, H = x.shape[:3]
    rest = x.shape[3:]
    send = x.reshape(T, B, P, H // P, *rest).movedim(2, 0).contiguous()  # P T B H/P ...
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.reshape(P * T, B, H // P, *rest)


def _heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """Inverse of _seq_to_heads: [P * T_local, B, H / P, ...] -> [T_local, B, H, ...]."""
    P = dist.get_world_size(group)
    PT, B, Hp = x.shape[:3]
    rest = x.shape[3:]
    T = PT // P
    send = x.reshape(P, T, B, Hp, *rest).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.movedim(0, 2).reshape(T, B, P * Hp, *rest)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _seq_to_heads(x, group)

    @staticmethod
    def backward(ctx, g):
        return _heads_to_seq(g.contiguous(), ctx.group), None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _heads_to_seq(x, group)

    @staticmethod
    def backward(ctx, g):
        return _seq_to_heads(g.contiguous(), ctx.group), None


def _natural_order(P: int, Tc: int, device) -> torch.Tensor:
    """Index into the rank-ordered gathered sequence giving natural order."""
    where = torch.empty(2 * P, dtype=torch.long)
    for r in range(P):
        lo, hi = zigzag_chunks(r, P)
        where[lo], where[hi] = 2 * r, 2 * r + 1
    t = torch.arange(Tc)
    return (where[:, None] * Tc + t[None, :]).reshape(-1).to(device)


def balanced_head_order(log_fgate: torch.Tensor, Hkv: int, group) -> torch.Tensor:
    """Permutation of the key/value heads that spreads predicted ACP work
    evenly over the CP ranks (rank r gets entries r*Hkv/P .. of it).

    log_fgate: [T_local, B, Hq] this rank's log forget gates.  A head's
    kept part of the attention matrix shrinks as its forgetting rate grows,
    so a group's work is predicted as sum over its query heads of 1 / rate.
    Groups are sorted by that, largest first, and dealt 0, 1, .., P-1,
    P-1, .., 0, ... (each rank ends with Hkv / P groups).
    """
    P = dist.get_world_size(group)
    Hq = log_fgate.shape[-1]
    rate = -log_fgate.detach().float().sum(dim=(0, 1))
    dist.all_reduce(rate, group=group)
    work = (1.0 / rate.clamp_min(1e-6)).view(Hkv, Hq // Hkv).sum(-1).cpu()
    return torch.tensor(snake_deal(work, P), dtype=torch.long, device=log_fgate.device)


def snake_deal(work: torch.Tensor, P: int) -> list:
    """Items sorted by ``work`` (largest first) dealt to P equal slots in the
    order 0..P-1, P-1..0, ...; returns the item ids slot after slot."""
    by_work = torch.sort(work, descending=True, stable=True).indices.tolist()
    slots = [[] for _ in range(P)]
    for i, h in enumerate(by_work):
        lap, pos = divmod(i, P)
        slots[pos if lap % 2 == 0 else P - 1 - pos].append(h)
    return [h for s in slots for h in s]


def _local_heads_acp(acp: Optional[AcpConfig], rank: int, P: int, Hq: int) -> Optional[AcpConfig]:
    """A per-head logit bound must follow the heads to their rank."""
    if acp is None or not isinstance(acp.logit_bound, torch.Tensor) or acp.logit_bound.dim() == 0:
        return acp
    U = acp.logit_bound
    if U.shape[-1] == Hq:
        U = U[..., rank * (Hq // P):(rank + 1) * (Hq // P)]
    return AcpConfig(log_eps=acp.log_eps, logit_bound=U)


def ulysses_attention(q, k, v, log_fgate, *, group, softmax_scale: float, acp: Optional[AcpConfig] = None,
                      backend: str = "auto", use_deepspeed: Optional[bool] = None,
                      cu_seqlens: Optional[torch.Tensor] = None, precise_decay: bool = False) -> torch.Tensor:
    """Forgetting attention over the CP group by head all-to-all (sbhd).

    q: [T_local, B, Hq, D], k/v: [T_local, B, Hkv, D], log_fgate
    [T_local, B, Hq] (zigzag-local).  Hkv must divide by the CP size (GQA
    groups stay whole on one rank).  cu_seqlens: optional document starts over
    the global (unsplit) rows, which is what every rank sees after the
    exchange.  Returns [T_local, B, Hq, D].
    """
    P, r = dist.get_world_size(group), dist.get_rank(group)
    Hq, Hkv = q.shape[2], k.shape[2]
    if Hkv % P:
        raise ValueError(f"Ulysses CP needs the key/value heads per TP rank ({Hkv}) to divide by the CP size ({P})")
    T = q.shape[0]
    head_inverse = None
    if acp is not None and Hkv > P:
        g = Hq // Hkv
        kv_perm = balanced_head_order(log_fgate, Hkv, group)
        q_perm = (kv_perm[:, None] * g + torch.arange(g, device=q.device)).reshape(-1)
        head_inverse = torch.empty_like(q_perm)
        head_inverse[q_perm] = torch.arange(Hq, device=q.device)
        q, log_fgate = q.index_select(2, q_perm), log_fgate.index_select(2, q_perm)
        k, v = k.index_select(2, kv_perm), v.index_select(2, kv_perm)
        if isinstance(acp.logit_bound, torch.Tensor) and acp.logit_bound.dim() and acp.logit_bound.shape[-1] == Hq:
            acp = AcpConfig(log_eps=acp.log_eps, logit_bound=acp.logit_bound.index_select(-1, q_perm.to(
                acp.logit_bound.device)))
    o = _ulysses(q, k, v, log_fgate, group, softmax_scale, acp, backend, use_deepspeed, cu_seqlens, precise_decay)
    return o if head_inverse is None else o.index_select(2, head_inverse)


def _ulysses(q, k, v, log_fgate, group, softmax_scale, acp, backend, use_deepspeed, cu_seqlens, precise_decay):
    P, r = dist.get_world_size(group), dist.get_rank(group)
    Hq, Hkv = q.shape[2], k.shape[2]
    T = q.shape[0]
    order = _natural_order(P, T // 2, q.device)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=q.device)
    local_acp = _local_heads_acp(acp, r, P, Hq)
    gate = _SeqToHeads.apply(log_fgate, group).index_select(0, order)
    # known on the host, the longest document lets the kernel check
    # cu_seqlens on the GPU instead of reading it back in every layer
    max_seqlen = longest_document(cu_seqlens) if cu_seqlens is not None else None

    def local_attention(qh, kh, vh, *args, **kwargs):
        o = forgetting_attention(
            qh.index_select(0, order), kh.index_select(0, order), vh.index_select(0, order), gate,
            layout="sbhd", softmax_scale=softmax_scale, acp=local_acp, backend=backend, cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen, precise_decay=precise_decay,
        )
        return o.index_select(0, inverse)

    if use_deepspeed is None:
        use_deepspeed = deepspeed_available()
    if use_deepspeed:
        _init_deepspeed_comm()
        from deepspeed.sequence.layer import DistributedAttention

        dist_attn = DistributedAttention(local_attention, group, scatter_idx=2, gather_idx=0, num_kv_heads=Hkv)
        return dist_attn(q, k, v, 1)
    qh, kh, vh = (_SeqToHeads.apply(t, group) for t in (q, k, v))
    return _HeadsToSeq.apply(local_attention(qh, kh, vh).contiguous(), group)


def _init_deepspeed_comm() -> None:
    import deepspeed.comm as ds_comm

    if not ds_comm.is_initialized():
        # wraps the torch.distributed process group that already exists
        ds_comm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False)
