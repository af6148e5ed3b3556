"""Public entry points for forgetting attention (FoX) with ACP.

``forgetting_attention`` is the op for a whole (possibly packed) sequence;
``attention_chunk_forward`` / ``attention_chunk_backward`` are the building
blocks for context parallelism: one query chunk against one key/value chunk
with given global decays, returning the log-sum-exp so that partial results
merge.  Inputs are checked here, once, at the door.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .acp import (
    AcpConfig,
    acp_threshold,
    kept_tile_fraction,
    logit_bound_from_tensors,
    reference_block_boundaries,
)
from .naive import (
    cumulative_log_decay,
    naive_attention_chunk,
    naive_forgetting_attention,
    reverse_cumulative_sum,
    token_document_ids,
)

__all__ = [
    "forgetting_attention",
    "AcpStats",
    "SequenceTable",
    "attention_chunk_forward",
    "attention_chunk_backward",
    "merge_partial_attention",
]

_LAYOUTS = ("bshd", "sbhd")
_TRITON_HEAD_DIMS = (16, 32, 64, 128)


@dataclass
class AcpStats:
    """What ACP did in one call.

    kept_tiles: [Hq] fraction of causal (query block, key block) tiles that
    were computed, per head.  threshold: [S, Hq] the delta used.  Cheap: both
    come from the block boundaries, never from the L x L matrix.
    """

    kept_tiles: torch.Tensor
    threshold: torch.Tensor

    @property
    def kept_fraction(self) -> float:
        return float(self.kept_tiles.mean())


@dataclass
class SequenceTable:
    """The sequences a call attends within, as (row, start, length) triples.

    Without packing: one sequence per batch row.  With ``cu_seqlens``: one per
    document; documents never cross rows.  ``max_len`` is the longest.
    """

    row: torch.Tensor  # int32 [S]
    start: torch.Tensor  # int32 [S]
    length: torch.Tensor  # int32 [S]
    max_len: int
    cu_seqlens: Optional[torch.Tensor]

    @property
    def num(self) -> int:
        return self.row.numel()

    @staticmethod
    def build(batch: int, seqlen: int, cu_seqlens: Optional[torch.Tensor], device) -> "SequenceTable":
        if cu_seqlens is None:
            return SequenceTable(
                row=torch.arange(batch, dtype=torch.int32, device=device),
                start=torch.zeros(batch, dtype=torch.int32, device=device),
                length=torch.full((batch,), seqlen, dtype=torch.int32, device=device),
                max_len=seqlen,
                cu_seqlens=None,
            )
        cu = _check_cu_seqlens(cu_seqlens, batch, seqlen)
        cu_dev = cu.to(device=device, dtype=torch.int64)
        lengths = cu[1:] - cu[:-1]
        return SequenceTable(
            row=(cu_dev[:-1] // seqlen).to(torch.int32),
            start=(cu_dev[:-1] % seqlen).to(torch.int32),
            length=(cu_dev[1:] - cu_dev[:-1]).to(torch.int32),
            max_len=int(lengths.max()) if lengths.numel() else 0,
            cu_seqlens=cu_dev,
        )


def _check_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1:
        raise ValueError("cu_seqlens must be a 1-D integer tensor of document starts plus the total")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    total = batch * seqlen
    if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != total:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at batch * seqlen = {total} "
            f"(got {cu[:1].tolist()} ... {cu[-1:].tolist()})"
        )
    if bool((cu[1:] < cu[:-1]).any()):
        raise ValueError("cu_seqlens must be non-decreasing")
    row_ends = torch.arange(1, batch, dtype=torch.int64) * seqlen
    if row_ends.numel() and not bool(torch.isin(row_ends, cu).all()):
        raise ValueError("cu_seqlens must contain every row boundary (b * seqlen): documents cannot cross rows")
    return cu


def _as_bshd(x: torch.Tensor, layout: str) -> torch.Tensor:
    # sbhd -> bshd is a transpose view: no copy, the kernels take strides.
    return x if layout == "bshd" else x.transpose(0, 1)


def _check_inputs(q, k, v, log_fgate, layout, backend):
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor in layout {layout}, got shape {tuple(getattr(t, 'shape', ()))}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    allowed = (torch.float16, torch.bfloat16, torch.float32)
    if backend == "torch":
        allowed = allowed + (torch.float64,)
    if q.dtype not in allowed:
        raise TypeError(f"q/k/v dtype {q.dtype} is not supported by the {backend} backend (use one of {allowed})")
    if not (q.device == k.device == v.device == log_fgate.device):
        raise ValueError("q, k, v and log_fgate must be on one device")
    qb, kb, vb = (_as_bshd(t, layout) for t in (q, k, v))
    B, T, Hq, D = qb.shape
    if kb.shape != vb.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if kb.shape[0] != B or kb.shape[1] != T or kb.shape[3] != D:
        raise ValueError(f"k/v shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} in layout {layout}")
    Hkv = kb.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if backend == "triton" and D not in _TRITON_HEAD_DIMS:
        raise ValueError(f"head dim {D} is not supported by the Triton kernel (supported: {_TRITON_HEAD_DIMS})")
    if log_fgate.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"log_fgate must be float32 (log forget gates are kept in fp32), got {log_fgate.dtype}")
    gb = _as_bshd(log_fgate, layout) if log_fgate.dim() == 3 else None
    if gb is None or tuple(gb.shape) != (B, T, Hq):
        expect = (B, T, Hq) if layout == "bshd" else (T, B, Hq)
        raise ValueError(f"log_fgate must have shape {expect} (one gate per token and query head), got {tuple(log_fgate.shape)}")
    return qb, kb, vb, gb


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the Triton backend needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU testing)")
    return backend


def _threshold(acp: Optional[AcpConfig], qb, kb, seqs: SequenceTable, scale: float) -> Optional[torch.Tensor]:
    """delta per (sequence, query head), float32 [S, Hq]; None when ACP is off."""
    if acp is None:
        return None
    if not isinstance(acp, AcpConfig):
        raise TypeError(f"acp must be an AcpConfig or None, got {type(acp).__name__}")
    S, Hq = seqs.num, qb.shape[2]
    if acp.logit_bound is None:
        seq_index = None
        if seqs.cu_seqlens is not None:
            seq_index = token_document_ids(seqs.cu_seqlens, qb.shape[0], qb.shape[1])
        U = logit_bound_from_tensors(qb, kb, scale, seq_index, S)
    else:
        U = torch.as_tensor(acp.logit_bound, dtype=torch.float32, device=qb.device)
        if U.dim() > 2 or (U.dim() >= 1 and U.shape[-1] not in (1, Hq)) or (U.dim() == 2 and U.shape[0] not in (1, S)):
            raise ValueError(f"logit_bound must be a scalar, [Hq] or [S, Hq] (Hq={Hq}, S={S}), got shape {tuple(U.shape)}")
        U = U.expand(S, Hq) if U.dim() else U.reshape(1, 1).expand(S, Hq)
    # N: the most keys one query of the sequence can see = its length
    N = seqs.length.to(device=qb.device, dtype=torch.float32)[:, None]
    return acp_threshold(U.to(qb.device), N, acp.log_eps).contiguous()


def _sequence_major_decay(c_bth: torch.Tensor, seqs: SequenceTable) -> torch.Tensor:
    """[S, H, max_len] decays of each sequence, padded with its last value."""
    B, T, H = c_bth.shape
    t = torch.arange(seqs.max_len, device=c_bth.device)
    length = seqs.length.long()
    pos = seqs.start.long()[:, None] + torch.minimum(t[None, :], (length - 1).clamp_min(0)[:, None])
    flat = seqs.row.long()[:, None] * T + pos  # S x max_len
    return c_bth.reshape(B * T, H)[flat].permute(0, 2, 1)


def forgetting_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_fgate: torch.Tensor,
    *,
    layout: str = "bshd",
    cu_seqlens: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    acp: Optional[AcpConfig] = None,
    backend: str = "auto",
    return_stats: bool = False,
):
    """Causal forgetting attention (FoX), optionally with ACP.

        o_i = sum_{j <= i} softmax_j(s * q_i . k_j + c_i - c_j) v_j,
        c_t = sum_{l <= t} log f_l   (restarting at each document)

    Args:
        q: [B, T, Hq, D] ("bshd") or [T, B, Hq, D] ("sbhd", Megatron's),
            fp16 or bf16 (fp32 also works; fp64 on the torch backend).
            Any strides with a unit last stride: no copy is made.
        k, v: [.., Hkv, D] with Hq a multiple of Hkv (GQA / MQA).
        log_fgate: [B, T, Hq] / [T, B, Hq] float32 log forget gates (<= 0),
            one per token and query head.
        cu_seqlens: optional int tensor [S + 1] of document starts over the
            row-major flattening of (batch, seq) tokens, ending at B * T and
            containing every row boundary.  Decay and attention restart at
            each document.
        softmax_scale: default 1 / sqrt(D).
        acp: ``AcpConfig`` to prune with Adaptive Computation Pruning, or None.
        backend: "auto" (Triton on CUDA, torch reference on CPU), "triton",
            or "torch".
        return_stats: also return ``AcpStats`` (None when ACP is off).

    Returns:
        o in q's layout and dtype (and the stats if asked for).  Gradients
        flow to q, k, v and log_fgate.
    """
    backend = _resolve_backend(backend, q.device)
    qb, kb, vb, gb = _check_inputs(q, k, v, log_fgate, layout, backend)
    B, T, Hq, D = qb.shape
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D)
    seqs = SequenceTable.build(B, T, cu_seqlens, q.device)
    thr = _threshold(acp, qb, kb, seqs, scale)

    if backend == "torch":
        out = naive_forgetting_attention(
            qb, kb, vb, gb, cu_seqlens=seqs.cu_seqlens, softmax_scale=scale, acp_threshold=thr
        )
        stats = None
        if return_stats and thr is not None:
            from .triton_ops import fwd_blocks

            bm, bn = fwd_blocks(D, q.dtype)
            with torch.no_grad():
                c_s = _sequence_major_decay(cumulative_log_decay(gb.detach(), seqs.cu_seqlens), seqs)
                kstart = reference_block_boundaries(c_s, thr, bm, bn)
                stats = AcpStats(kept_tile_fraction(kstart, seqs.length, bm, bn), thr)
    else:
        from .triton_ops import ForgettingAttentionFunction

        out, kstart, blocks = ForgettingAttentionFunction.apply(qb, kb, vb, gb, seqs, scale, thr)
        stats = None
        if return_stats and thr is not None:
            stats = AcpStats(kept_tile_fraction(kstart, seqs.length, *blocks), thr)

    out = out if layout == "bshd" else out.transpose(0, 1)
    return (out, stats) if return_stats else out


def attention_chunk_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    c_q: torch.Tensor,
    c_k: torch.Tensor,
    *,
    causal: bool,
    softmax_scale: float,
    acp_threshold: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One query chunk against one key/value chunk (context-parallel block).

    q: [B, Tq, Hq, D], k/v: [B, Tk, Hkv, D] (bshd views; any strides with a
    unit last stride).  c_q: [B, Hq, Tq], c_k: [B, Hq, Tk] float32 *global*
    cumulative decays of those tokens.  causal=True for the diagonal chunk
    (same tokens); otherwise every key precedes every query.
    acp_threshold: [B, Hq] or None.

    Returns (out [B, Tq, Hq, D] in q's dtype, lse [B, Hq, Tq] float32, natural
    log; -inf where every key was pruned).  No autograd: pair it with
    ``attention_chunk_backward``.
    """
    backend = _resolve_backend(backend, q.device)
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError("a causal (diagonal) chunk needs as many queries as keys")
    if backend == "torch":
        with torch.no_grad():
            out, lse = naive_attention_chunk(
                q, k, v, c_q.permute(0, 2, 1), c_k.permute(0, 2, 1), causal=causal,
                softmax_scale=softmax_scale, acp_threshold=acp_threshold,
            )
        return out, lse.float()
    from .triton_ops import chunk_forward

    return chunk_forward(q, k, v, c_q, c_k, causal, softmax_scale, acp_threshold)


def attention_chunk_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    c_q: torch.Tensor,
    c_k: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool,
    softmax_scale: float,
    acp_threshold: Optional[torch.Tensor] = None,
    backend: str = "auto",
):
    """Gradients of one chunk pair given the *merged* output and lse.

    ``out`` and ``lse`` are the final (merged over all key chunks) attention
    output and log-sum-exp of the query chunk, as in FlashAttention's ring
    backward.  Returns (dq, dk, dv, dc_q [B, Hq, Tq], dc_k [B, Hq, Tk]) where
    dc are float32 gradients with respect to the global decays c_q and c_k.
    """
    backend = _resolve_backend(backend, q.device)
    if backend == "torch":
        return _torch_chunk_backward(do, q, k, v, c_q, c_k, out, lse, causal, softmax_scale, acp_threshold)
    from .triton_ops import chunk_backward

    return chunk_backward(do, q, k, v, c_q, c_k, out, lse, causal, softmax_scale, acp_threshold)


def _torch_chunk_backward(do, q, k, v, c_q, c_k, out, lse, causal, scale, thr):
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, Tq, Hq, D = q.shape
    group = Hq // k.shape[2]
    qf = q.to(cd).permute(0, 2, 1, 3)
    kf = k.to(cd).repeat_interleave(group, dim=2).permute(0, 2, 1, 3)
    vf = v.to(cd).repeat_interleave(group, dim=2).permute(0, 2, 1, 3)
    dof = do.to(cd).permute(0, 2, 1, 3)
    decay = c_q.to(cd)[..., :, None] - c_k.to(cd)[..., None, :]
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale + decay
    keep = torch.ones(s.shape[-2:], dtype=torch.bool, device=q.device)
    if causal:
        keep = torch.tril(keep)
    keep = keep.expand_as(s)
    if thr is not None:
        keep = keep & (decay >= thr.to(cd)[:, :, None, None])
    lse_c = lse.to(cd)
    safe = torch.where(torch.isfinite(lse_c), lse_c, torch.zeros_like(lse_c))
    p = torch.where(keep, torch.exp(s - safe[..., None]), torch.zeros_like(s))
    dv = torch.matmul(p.transpose(-1, -2), dof)
    dp = torch.matmul(dof, vf.transpose(-1, -2))
    delta = (dof * out.to(cd).permute(0, 2, 1, 3)).sum(-1)
    ds = p * (dp - delta[..., None])
    dq = torch.matmul(ds, kf) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qf) * scale
    Hkv = k.shape[2]
    dk = dk.view(B, Hkv, group, -1, D).sum(2)
    dv = dv.view(B, Hkv, group, -1, D).sum(2)
    dc_q = ds.sum(-1).float()
    dc_k = (-ds.sum(-2)).float()
    to = lambda x, ref: x.permute(0, 2, 1, 3).to(ref.dtype)
    return to(dq, q), to(dk, k), to(dv, v), dc_q, dc_k


def merge_partial_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attention results over disjoint key sets.

    out: [B, T, H, D], lse: [B, H, T] (natural log, -inf for "no keys").
    Returns (out in float32, lse), the log-sum-exp rule of ring attention
    (as in ring-flash-attn): o = sum_x exp(lse_x - lse) o_x.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    # rows with no kept key on either side stay (0, -inf) instead of NaN
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w_a = torch.exp(lse_a - safe).permute(0, 2, 1)[..., None]
    w_b = torch.exp(lse_b - safe).permute(0, 2, 1)[..., None]
    return out_a.float() * w_a + out_b.float() * w_b, lse
