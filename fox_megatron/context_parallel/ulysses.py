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
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.distributed as dist

from fox_megatron.kernels import AcpConfig, forgetting_attention

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
                      cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
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
    order = _natural_order(P, T // 2, q.device)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=q.device)
    local_acp = _local_heads_acp(acp, r, P, Hq)
    gate = _SeqToHeads.apply(log_fgate, group).index_select(0, order)

    def local_attention(qh, kh, vh, *args, **kwargs):
        o = forgetting_attention(
            qh.index_select(0, order), kh.index_select(0, order), vh.index_select(0, order), gate,
            layout="sbhd", softmax_scale=softmax_scale, acp=local_acp, backend=backend, cu_seqlens=cu_seqlens,
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
