"""Pure-torch forgetting attention: the test oracle and the CPU execution path.

Everything here materialises the full score matrix, so it is meant for short
sequences (tests, CPU demo runs).  It is differentiable through autograd, runs
in float64 when given float64 inputs.  With a threshold ``thr`` the pair
(i, j) is dropped when ``D_ij = c_i - c_j < thr``: every pair that ACP's
bound allows to drop.  The kernels skip whole tiles only (every pair of a
skipped tile is below the threshold), so they drop a subset of those pairs,
which one depending on their tile shape; given ``prune_decay`` from
``tile_rule_decay``, the reference drops exactly what a kernel with those
tiles drops (the tests' oracle of the kernels' own pruning).

All tensors here use the [batch, seq, heads, dim] ("bshd") layout.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = [
    "cumulative_log_decay",
    "naive_forgetting_attention",
    "naive_attention_chunk",
    "token_document_ids",
    "reverse_cumulative_sum",
    "cumulative_log_decay_bht",
    "reverse_cumulative_sum_bht",
    "pair_decay",
    "pair_keep",
    "tile_rule_decay",
]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def token_document_ids(cu_seqlens: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Document index of every token, shape [batch, seqlen] (int64).

    ``cu_seqlens`` holds document starts over the row-major flattening of
    (batch, seq): token (b, t) is flat index ``b * seqlen + t``.
    """
    flat = torch.arange(batch * seqlen, device=cu_seqlens.device)
    ids = torch.searchsorted(cu_seqlens.to(torch.int64), flat, right=True) - 1
    return ids.view(batch, seqlen)


def _doc_offsets(prefix: torch.Tensor, cu_seqlens: torch.Tensor, at_start: bool) -> torch.Tensor:
    """Per-token offset that turns a per-row prefix (or suffix) sum over time
    (last dim of ``prefix`` [B, H, T]) into a per-document one."""
    B, H, T = prefix.shape
    doc = token_document_ids(cu_seqlens, B, T).view(-1)
    edge = cu_seqlens[:-1].to(torch.int64) if at_start else cu_seqlens[1:].to(torch.int64)
    # the prefix value just before a document's start (suffix value just
    # after its end) within the same row; zero at row edges
    inside = (edge % T) != 0
    idx = torch.where(inside, edge - 1 if at_start else edge, torch.zeros_like(edge))
    flat = prefix.permute(0, 2, 1).reshape(B * T, H)
    off = torch.where(inside[:, None], flat[idx], torch.zeros_like(flat[idx]))
    return off[doc].view(B, T, H).permute(0, 2, 1)


def cumulative_log_decay_bht(
    log_fgate: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """c along the last dim of a [B, H, T] tensor (time innermost, which is
    where GPU scans are fast), restarting at every document; accumulated in
    float64 so that the per-document restart loses nothing."""
    c = torch.cumsum(log_fgate.to(torch.float64), dim=-1)
    if cu_seqlens is not None:
        c = c - _doc_offsets(c, cu_seqlens, at_start=True)
    return c.to(dtype)


def reverse_cumulative_sum_bht(dc: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
                               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """g_l = sum_{t >= l, same document} dc_t along the last dim of [B, H, T]:
    the gradient of ``cumulative_log_decay_bht``."""
    x = dc.to(torch.float64)
    suffix = x.sum(-1, keepdim=True) - torch.cumsum(x, dim=-1) + x
    if cu_seqlens is not None:
        suffix = suffix - _doc_offsets(suffix, cu_seqlens, at_start=False)
    return suffix.to(dtype)


def cumulative_log_decay(
    log_fgate: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """c_t = sum_{l <= t} log f_l along dim 1 of [B, T, H], restarting at
    every document.  Returned in ``dtype`` (default float32, float64 for
    float64 input)."""
    if dtype is None:
        dtype = torch.float64 if log_fgate.dtype == torch.float64 else torch.float32
    return cumulative_log_decay_bht(log_fgate.transpose(1, 2), cu_seqlens, dtype).transpose(1, 2)


def pair_decay(c_q: torch.Tensor, c_k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """D_ij = c_i - c_j ([..., Tq] against [..., Tk] -> [..., Tq, Tk]) in
    ``dtype``, subtracted in the decays' own precision first: |c| grows
    along a sequence, and float64 decays (what the scans produce) lose their
    low bits if rounded to float32 before the difference is taken."""
    wide = torch.float64 if torch.float64 in (c_q.dtype, c_k.dtype) else dtype
    return (c_q.to(wide)[..., :, None] - c_k.to(wide)[..., None, :]).to(dtype)


def _tile_edges(T: int, block: int, piece, last: bool, device) -> torch.Tensor:
    # per token: the index of its tile's first (last=False) or last token,
    # tiles counted from its sequence's start; [B, T] or [T]
    t = torch.arange(T, device=device)
    if piece is None:
        start, length = torch.zeros_like(t), torch.full_like(t, T)
    else:
        start, length = (x.to(device=device, dtype=torch.long) for x in piece)
    tile = (t - start) // block
    if last:
        edge = torch.minimum(start + (tile + 1) * block, start + length) - 1
    else:
        edge = start + tile * block
    return edge.clamp(0, T - 1)  # tokens of no sequence: any index (their pairs are masked)


def tile_rule_decay(
    c_q: torch.Tensor,
    c_k: torch.Tensor,
    block_m: int,
    block_n: int,
    q_piece: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    k_piece: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """The decay that ACP's tile rule compares with the threshold, per pair.

    c_q: [B, Tq, H], c_k: [B, Tk, H].  Returns [B, H, Tq, Tk] (float64):
    c_q at the first query of the pair's (block_m x block_n) tile minus c_k
    at the tile's last key, the largest decay in the tile, so that the
    threshold drops a pair exactly when the kernels skip its tile.  Tiles
    start at each sequence's first query and key: q_piece / k_piece, optional
    (start, length) int tensors [B, Tq] / [B, Tk], give every token its
    sequence (document piece) within the chunk; without them the chunk is
    one sequence.
    """
    B, Tq, H = c_q.shape
    Tk = c_k.shape[1]
    iq = _tile_edges(Tq, block_m, q_piece, False, c_q.device).expand(B, Tq)
    ik = _tile_edges(Tk, block_n, k_piece, True, c_k.device).expand(B, Tk)
    cq = torch.gather(c_q.double(), 1, iq[..., None].expand(B, Tq, H))
    ck = torch.gather(c_k.double(), 1, ik[..., None].expand(B, Tk, H))
    return pair_decay(cq.permute(0, 2, 1), ck.permute(0, 2, 1), torch.float64)


def pair_keep(
    decay: torch.Tensor,
    causal: bool,
    same_doc: Optional[torch.Tensor] = None,
    acp_threshold: Optional[torch.Tensor] = None,
    query_threshold: Optional[torch.Tensor] = None,
    prune_decay: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """[B, Hq, Tq, Tk] bool: the pairs the reference keeps.  decay:
    [B, Hq, Tq, Tk] (its dtype is the compare's); the other arguments as
    for ``naive_attention_chunk``."""
    B, Hq, Tq, Tk = decay.shape
    keep = torch.ones(Tq, Tk, dtype=torch.bool, device=decay.device)
    if causal:
        keep = torch.tril(keep)
    keep = keep.expand(B, Hq, Tq, Tk)
    if same_doc is not None:
        keep = keep & same_doc[:, None]
    d = decay if prune_decay is None else prune_decay.to(decay.dtype)
    if query_threshold is not None:
        keep = keep & (d >= query_threshold.to(decay.dtype).permute(0, 2, 1)[..., None])
    elif acp_threshold is not None:
        keep = keep & (d >= acp_threshold.to(decay.dtype)[:, :, None, None])
    return keep


def naive_attention_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    c_q: torch.Tensor,
    c_k: torch.Tensor,
    *,
    causal: bool,
    softmax_scale: float,
    acp_threshold: Optional[torch.Tensor] = None,
    same_doc: Optional[torch.Tensor] = None,
    query_threshold: Optional[torch.Tensor] = None,
    prune_decay: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention of a query chunk against a key/value chunk with given decays.

    q: [B, Tq, Hq, D]; k, v: [B, Tk, Hkv, D]; c_q: [B, Tq, Hq]; c_k: [B, Tk, Hq]
    (global cumulative log-decays of the query and key tokens).
    causal: the chunks are the same tokens (diagonal block, query i sees keys
    j <= i); otherwise every key precedes every query.
    acp_threshold: [B, Hq] pruning threshold (drop D_ij < thr), or None.
    query_threshold: [B, Tq, Hq] per-query threshold, overrides acp_threshold
    (used for packed documents, where it is per document).
    same_doc: optional [B, Tq, Tk] bool mask of allowed pairs.
    prune_decay: optional [B, Hq, Tq, Tk], what the threshold is compared
    with instead of D_ij (``tile_rule_decay``: the kernels' tile rule).

    Returns (out [B, Tq, Hq, D] in q's dtype, lse [B, Hq, Tq] in the compute
    dtype, natural log).  A query whose keys are all dropped gets out = 0 and
    lse = -inf, so that partial results merge with the log-sum-exp rule.
    """
    cd = _compute_dtype(q)
    B, Tq, Hq, D = q.shape
    Hkv = k.shape[2]
    group = Hq // Hkv
    qf = q.to(cd).permute(0, 2, 1, 3)  # B H Tq D
    kf = k.to(cd).repeat_interleave(group, dim=2).permute(0, 2, 1, 3)
    vf = v.to(cd).repeat_interleave(group, dim=2).permute(0, 2, 1, 3)
    decay = pair_decay(c_q.permute(0, 2, 1), c_k.permute(0, 2, 1), cd)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * softmax_scale + decay
    keep = pair_keep(decay, causal, same_doc, acp_threshold, query_threshold, prune_decay)
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # B H Tq
    safe_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(s - safe_lse[..., None])
    out = torch.matmul(p, vf).permute(0, 2, 1, 3).to(q.dtype)
    return out, lse


def naive_forgetting_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_fgate: torch.Tensor,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    acp_threshold: Optional[torch.Tensor] = None,
    return_lse: bool = False,
):
    """Causal forgetting attention, [B, T, H, D] layout, differentiable.

    log_fgate: [B, T, Hq] log forget gates (<= 0).  cu_seqlens: optional
    document starts over the flattened (B * T) tokens; documents never cross
    rows.  acp_threshold: [S, Hq] per sequence (row, or document when packed).
    """
    B, T, Hq, D = q.shape
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(D)
    c = cumulative_log_decay(log_fgate, cu_seqlens, dtype=torch.float64)
    same_doc = None
    query_thr = None
    if cu_seqlens is not None:
        doc = token_document_ids(cu_seqlens, B, T)
        same_doc = doc[:, :, None] == doc[:, None, :]
        if acp_threshold is not None:
            query_thr = acp_threshold[doc]  # [B, T, Hq]
    thr = acp_threshold if cu_seqlens is None else None
    out, lse = naive_attention_chunk(
        q, k, v, c, c, causal=True, softmax_scale=softmax_scale, acp_threshold=thr,
        same_doc=same_doc, query_threshold=query_thr,
    )
    return (out, lse) if return_lse else out


def reverse_cumulative_sum(dc: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Gradient of ``cumulative_log_decay``: g_l = sum_{t >= l, same doc} dc_t
    along dim 1 of [B, T, H]."""
    out_dtype = torch.float64 if dc.dtype == torch.float64 else torch.float32
    return reverse_cumulative_sum_bht(dc.transpose(1, 2), cu_seqlens, out_dtype).transpose(1, 2)
