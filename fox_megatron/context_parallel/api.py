"""Context-parallel forgetting attention: one entry point for both modes."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from fox_megatron.kernels import AcpConfig, acp_threshold
from fox_megatron.kernels.forgetting_attn.interface import _resolve_backend

from .decay import global_cumulative_decay
from .documents import RingDocuments, ring_documents
from .ring import RingStats, ring_attention
from .skip_table import RingPlan, chunk_need_table
from .ulysses import ulysses_attention

__all__ = ["cp_forgetting_attention", "cp_acp_threshold", "CP_MODES"]

CP_MODES = ("ring", "ulysses")


def cp_acp_threshold(acp: AcpConfig, q, k, softmax_scale: float, group, global_len: int,
                     documents: Optional[RingDocuments] = None) -> torch.Tensor:
    """ACP delta [B, Hq] for whole sequences split over the CP group.

    Identical on every rank and to the single-device threshold: the logit
    bound's maxima of ||q|| and ||k|| are reduced over the group (MAX), and
    N is the global sequence length.  q, k in bshd.  With ``documents``
    (packed): one delta per document, [documents, Hq], as single-device
    attention sets it: maxima per document, N = the document's length.
    """
    if documents is not None:
        return _document_threshold(acp, q, k, softmax_scale, group, documents)
    B, _, Hq, _ = q.shape
    if acp.logit_bound is None:
        Hkv = k.shape[2]
        m = torch.cat([q.detach().float().norm(dim=-1).amax(1), k.detach().float().norm(dim=-1).amax(1)], dim=-1)
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        U = softmax_scale * m[:, :Hq] * m[:, Hq:].repeat_interleave(Hq // Hkv, dim=1)
    elif isinstance(acp.logit_bound, (int, float)):
        U = torch.full((B, Hq), float(acp.logit_bound), device=q.device)  # a fill, no host-to-device copy
    else:
        U = torch.as_tensor(acp.logit_bound, dtype=torch.float32, device=q.device)
        U = U.reshape(-1, Hq) if U.dim() == 2 else U
        U = U.expand(B, Hq) if U.dim() else U.reshape(1, 1).expand(B, Hq)
    return acp_threshold(U.to(q.device), global_len, acp.log_eps).expand(B, Hq).contiguous()


def _document_threshold(acp: AcpConfig, q, k, softmax_scale: float, group, docs: RingDocuments) -> torch.Tensor:
    S, Hq, Hkv = docs.num, q.shape[2], k.shape[2]
    if acp.logit_bound is None:
        # per-document maxima of this rank's tokens, then MAX over the group
        norms = torch.cat([q.detach().float().norm(dim=-1), k.detach().float().norm(dim=-1)], dim=-1)  # B T Hq+Hkv
        idx = docs.local_doc_ids(dist.get_rank(group), q.device).reshape(-1, 1).expand(-1, Hq + Hkv)
        m = torch.zeros(S, Hq + Hkv, device=q.device).scatter_reduce_(
            0, idx, norms.reshape(-1, Hq + Hkv), "amax", include_self=True)
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        U = softmax_scale * m[:, :Hq] * m[:, Hq:].repeat_interleave(Hq // Hkv, dim=1)
    else:
        U = torch.as_tensor(acp.logit_bound, dtype=torch.float32, device=q.device)
        if U.dim() > 2 or (U.dim() >= 1 and U.shape[-1] not in (1, Hq)) or (U.dim() == 2 and U.shape[0] not in (1, S)):
            raise ValueError(f"logit_bound must be a scalar, [Hq] or [documents, Hq] (Hq={Hq}, documents={S}), "
                             f"got shape {tuple(U.shape)}")
        U = U.expand(S, Hq) if U.dim() else U.reshape(1, 1).expand(S, Hq)
    N = docs.lengths.to(device=q.device, dtype=torch.float32)[:, None]
    return acp_threshold(U.to(q.device), N, acp.log_eps).contiguous()


def cp_forgetting_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_fgate: torch.Tensor,
    *,
    group,
    mode: str = "ring",
    layout: str = "bshd",
    softmax_scale: Optional[float] = None,
    acp: Optional[AcpConfig] = None,
    skip: str = "acp",
    backend: str = "auto",
    stats: Optional[RingStats] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    two_way: bool = True,
    sub_blocks: Optional[int] = None,
    use_deepspeed: Optional[bool] = None,
    merge_pairs: bool = True,
    precise_decay: bool = False,
) -> torch.Tensor:
    """``forgetting_attention`` for a sequence split over a context-parallel group.

    Each rank passes its zigzag-local tokens (chunks r and 2P-1-r, as
    Megatron's get_batch_on_this_cp_rank gives them) and gets the outputs of
    those tokens, equal to whole-sequence attention.  mode "ring": pruning-
    aware ring (``skip`` "acp" or "dense"; ``stats`` collects bytes sent);
    "ulysses": head all-to-all.  ``cu_seqlens`` (both modes): document
    starts over the row-major flattening of the *global* (unsplit) [B, L]
    tokens, as for ``forgetting_attention`` at CP = 1 (ACP thresholds per
    document as there); the ring then also skips, and does not send, key
    sub-blocks that no query of a chunk shares a document with.
    ``two_way``: second chunks travel the ring
    backward (fewer bytes) or, False, forward with the first chunks (equal
    work at every step).  ``sub_blocks``: parts of a chunk that are sent and
    pruned separately (default: 4 when the chunk divides by 4, else 1; 1 =
    whole chunks).  ``merge_pairs`` (ring): few kernel calls per ring step, for
    all rows whatever sub-blocks each keeps and for both query chunks
    (default: the diagonals in one call, the earlier key chunks in another),
    or one call per chunk pair and kept-suffix length.  ``use_deepspeed`` (Ulysses): DeepSpeed's
    DistributedAttention (default when importable) or the local all-to-all.
    ``precise_decay``: as for ``forgetting_attention``; the ring then keeps
    the global decays (which grow with the whole sequence) in float64 and
    sends them so.  Gradients reach q, k, v and log_fgate.
    """
    if mode not in CP_MODES:
        raise ValueError(f"cp_mode must be one of {CP_MODES}, got {mode!r}")
    if skip not in ("acp", "dense"):
        raise ValueError(f"skip must be 'acp' or 'dense', got {skip!r}")
    if layout not in ("bshd", "sbhd"):
        raise ValueError(f"layout must be 'bshd' or 'sbhd', got {layout!r}")
    P = dist.get_world_size(group)
    seq_dim = 1 if layout == "bshd" else 0
    T = q.shape[seq_dim]
    if T % 2:
        raise ValueError(f"the local sequence ({T}) must hold two equal zigzag chunks")
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if mode == "ulysses":
        to_s = (lambda x: x.transpose(0, 1)) if layout == "bshd" else (lambda x: x)
        o = ulysses_attention(to_s(q), to_s(k), to_s(v), to_s(log_fgate), group=group, softmax_scale=scale,
                              acp=acp, backend=backend, cu_seqlens=cu_seqlens,
                              use_deepspeed=use_deepspeed, precise_decay=precise_decay)
        return to_s(o)

    to_b = (lambda x: x) if layout == "bshd" else (lambda x: x.transpose(0, 1))
    qb, kb, vb, gb = to_b(q), to_b(k), to_b(v), to_b(log_fgate)
    # float64 decays take the kernels' precise path; the torch
    # path takes decays in float64 anyway, as single-device attention does
    on_torch = _resolve_backend(backend, q.device) == "torch"
    c_dtype = torch.float64 if precise_decay or on_torch or q.dtype == torch.float64 else torch.float32
    Tc = T // 2
    if sub_blocks is None:
        sub_blocks = 4 if Tc % 4 == 0 else 1
    docs = ring_documents(cu_seqlens, qb.shape[0], P * T, P, sub_blocks) if cu_seqlens is not None else None
    c, c_first, c_last = global_cumulative_decay(gb.permute(0, 2, 1), group, c_dtype, sub_blocks, docs)
    thr = cp_acp_threshold(acp, qb, kb, scale, group, P * T, docs) if acp is not None else None
    need_thr = thr if skip == "acp" else None
    if docs is not None and need_thr is not None:
        need_thr = docs.chunk_thresholds(need_thr)  # the first document's, per query chunk
    need = chunk_need_table(c_first, c_last, need_thr, docs.need_mask() if docs is not None else None)
    plan = RingPlan.build(need, dist.get_rank(group), kb.shape[2], two_way=two_way, documents=docs,
                          merge_pairs=merge_pairs, hidden_pruned=thr is not None)
    out, _ = ring_attention(qb, kb, vb, c, thr, plan, group, scale, backend, stats)
    return to_b(out)
