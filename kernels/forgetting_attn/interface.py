"""Public entry points for forgetting attention (FoX) with ACP.

``forgetting_attention`` is the op for a whole (possibly packed) sequence;
``attention_chunk_forward`` / ``attention_chunk_backward`` are the building
blocks for context parallelism: one query chunk against one key/value chunk
with given global decays, returning the log-sum-exp so that partial results
merge.  Inputs are checked here, once, at the door.
"""

from __future__ import annotations

import functools
import math
import os
import weakref
from dataclasses import dataclass, field
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
    pair_decay,
    pair_keep,
    token_document_ids,
)

__all__ = [
    "forgetting_attention",
    "AcpStats",
    "SequenceTable",
    "ChunkSegments",
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
    were computed, per head.  threshold: [S, Hq] the delta used, or None when
    the call ran without pruning (sequences shorter than
    ``AcpConfig.min_seqlen``; kept_tiles is then 1).  Cheap: both come from
    the block boundaries, never from the L x L matrix.
    """

    kept_tiles: torch.Tensor
    threshold: Optional[torch.Tensor]

    @property
    def kept_fraction(self) -> float:
        return float(self.kept_tiles.mean())


class SameTensorCache:
    """One entry, valid while it is asked about the very same tensor (the
    same object, not modified in place since).  Every layer of a micro-batch
    passes Megatron's one ``PackedSeqParams``, so what is derived from its
    ``cu_seqlens`` (device tables, checks, a read-back that waits for the
    GPU) is derived once per micro-batch instead of once per layer."""

    def __init__(self):
        self._ref = None
        self._key = None
        self._value = None

    def get(self, tensor: torch.Tensor, key: tuple, build):
        key = (tensor._version,) + tuple(key)
        if self._ref is not None and self._ref() is tensor and self._key == key:
            return self._value
        value = build()
        self._ref, self._key, self._value = weakref.ref(tensor), key, value
        return value


_SEQUENCE_TABLES = SameTensorCache()


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
    # what calls derive from the table alone (ACP thresholds of a fixed
    # logit bound), kept for the next call (layer) that passes the same one
    derived: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num(self) -> int:
        return self.row.numel()

    @staticmethod
    def build(batch: int, seqlen: int, cu_seqlens: Optional[torch.Tensor], device,
              max_seqlen: Optional[int] = None) -> "SequenceTable":
        """``max_seqlen``: the longest document, when the caller knows it
        (Megatron's ``PackedSeqParams.max_seqlen_q``).  With it, a
        ``cu_seqlens`` on the GPU is checked on the GPU and the host never
        waits for the device; without it the offsets are read back once.
        Built once for all the calls (layers) that pass the same tensor."""
        if cu_seqlens is None:
            return _rows_table(batch, seqlen, torch.device(device))
        if not isinstance(cu_seqlens, torch.Tensor):
            return SequenceTable._build(batch, seqlen, cu_seqlens, device, max_seqlen)
        key = (batch, seqlen, str(torch.device(device)), max_seqlen)
        return _SEQUENCE_TABLES.get(cu_seqlens, key,
                                    lambda: SequenceTable._build(batch, seqlen, cu_seqlens, device, max_seqlen))

    @staticmethod
    def _build(batch, seqlen, cu_seqlens, device, max_seqlen) -> "SequenceTable":
        device = torch.device(device)
        if max_seqlen is not None:
            max_seqlen = int(max_seqlen)
            if max_seqlen < 1:
                raise ValueError(f"max_seqlen must be >= 1, got {max_seqlen}")
        if max_seqlen is not None and isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.device.type != "cpu":
            cu_dev = _check_cu_seqlens_on_device(cu_seqlens, batch, seqlen, max_seqlen).to(device)
            max_len = max_seqlen
        else:
            cu = _check_cu_seqlens(cu_seqlens, batch, seqlen)
            lengths = cu[1:] - cu[:-1]
            max_len = int(lengths.max()) if lengths.numel() else 0
            if max_seqlen is not None and max_len > max_seqlen:
                raise ValueError(f"cu_seqlens holds a document of {max_len} tokens, longer than max_seqlen={max_seqlen}")
            if device.type == "cuda":
                # a pinned source lets the copy run behind the host
                cu_dev = cu.pin_memory().to(device, non_blocking=True)
            else:
                cu_dev = cu.to(device)
        return SequenceTable(
            row=(cu_dev[:-1] // seqlen).to(torch.int32),
            start=(cu_dev[:-1] % seqlen).to(torch.int32),
            length=(cu_dev[1:] - cu_dev[:-1]).to(torch.int32),
            max_len=max_len,
            cu_seqlens=cu_dev,
        )


@dataclass
class ChunkSegments:
    """The document-local pieces of one (query chunk, key chunk) pair.

    With packed documents a query sees only keys of its own document, so a
    chunk pair splits into one piece per (batch row, document) that has
    queries in the query chunk and keys in the key chunk: queries
    [qstart, qstart + qlen) against keys [kstart, kstart + klen) of batch row
    ``row``, positions local to the chunks.  Pieces of different documents
    cover disjoint queries and disjoint keys.  In a causal (diagonal) pair
    every piece is aligned (qstart == kstart, qlen == klen) and causal inside;
    otherwise every key of a piece precedes its queries.  A query in no piece
    gets out = 0 and lse = -inf, a key in no piece zero gradients.

    ``doc`` is each piece's document (index into cu_seqlens), for
    per-document ACP thresholds.  Build with ``from_documents``; the int32
    tables go to the kernels as they are (``to(device)`` once).
    """

    row: torch.Tensor  # int32 [S]
    qstart: torch.Tensor  # int32 [S]
    qlen: torch.Tensor  # int32 [S]
    kstart: torch.Tensor  # int32 [S]
    klen: torch.Tensor  # int32 [S]
    doc: torch.Tensor  # int64 [S]
    max_qlen: int
    max_klen: int

    @property
    def num(self) -> int:
        return self.row.numel()

    def to(self, device) -> "ChunkSegments":
        mv = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return ChunkSegments(mv(self.row), mv(self.qstart), mv(self.qlen), mv(self.kstart), mv(self.klen),
                             mv(self.doc), self.max_qlen, self.max_klen)

    @staticmethod
    def from_documents(
        cu_seqlens: torch.Tensor,
        seqlen: int,
        q_start: int,
        q_len: int,
        k_start: int,
        k_len: int,
        rows: Optional[torch.Tensor] = None,
    ) -> "ChunkSegments":
        """Pieces of the pair (queries [q_start, q_start + q_len), keys
        [k_start, k_start + k_len)) of packed rows of length ``seqlen``.

        cu_seqlens: document starts over the row-major flattening of the
        [B, seqlen] tokens (as for ``forgetting_attention``).  rows: the batch
        row of every row of the chunk tensors (default: row b is batch row
        b); ``row`` of a piece indexes the chunk tensors.  Host-side and
        O(documents): the result is on the CPU.
        """
        cu = cu_seqlens.detach().to("cpu", torch.int64)
        B = int(cu[-1]) // seqlen
        if rows is None:
            rows = torch.arange(B)
        rows = rows.to("cpu", torch.int64)
        base = rows * seqlen
        doc_at = lambda pos: torch.searchsorted(cu, base + pos, right=True) - 1  # noqa: E731
        # documents meeting both ranges: from the later first document to the
        # earlier last one (empty documents in between are dropped below)
        lo = torch.maximum(doc_at(q_start), doc_at(k_start))
        hi = torch.minimum(doc_at(q_start + q_len - 1), doc_at(k_start + k_len - 1))
        count = (hi - lo + 1).clamp_min(0)
        entry_row = torch.repeat_interleave(torch.arange(rows.numel()), count)
        first = torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
        doc = lo[entry_row] + torch.arange(entry_row.numel()) - first
        off = base[entry_row]
        d0, d1 = cu[doc] - off, cu[doc + 1] - off
        qs, qe = d0.clamp_min(q_start), d1.clamp_max(q_start + q_len)
        ks, ke = d0.clamp_min(k_start), d1.clamp_max(k_start + k_len)
        keep = (qe > qs) & (ke > ks)
        i32 = lambda t: t[keep].to(torch.int32)  # noqa: E731
        qlen, klen = i32(qe - qs), i32(ke - ks)
        return ChunkSegments(
            row=i32(entry_row), qstart=i32(qs - q_start), qlen=qlen, kstart=i32(ks - k_start), klen=klen,
            doc=doc[keep], max_qlen=int(qlen.max()) if qlen.numel() else 0,
            max_klen=int(klen.max()) if klen.numel() else 0,
        )


def _check_segments(seg: ChunkSegments, B: int, Tq: int, Tk: int, Hq: int, causal: bool, thr) -> None:
    if not isinstance(seg, ChunkSegments):
        raise TypeError(f"segments must be a ChunkSegments, got {type(seg).__name__}")
    if thr is not None and tuple(thr.shape) != (seg.num, Hq):
        raise ValueError(f"with segments the ACP threshold is per piece: [{seg.num}, {Hq}], got {tuple(thr.shape)}")
    if seg.row.device.type != "cpu" or not seg.num:
        return  # tables on the GPU are not read back (no sync)
    qs, ql, ks, kl = (t.long() for t in (seg.qstart, seg.qlen, seg.kstart, seg.klen))
    ok = (seg.row >= 0) & (seg.row < B) & (ql >= 1) & (kl >= 1) & (qs >= 0) & (ks >= 0)
    ok &= (qs + ql <= Tq) & (ks + kl <= Tk)
    if causal:
        ok &= (qs == ks) & (ql == kl)
    if not bool(ok.all()):
        raise ValueError("segments out of the chunks' bounds, empty, or (causal pair) not aligned")


def _segment_masks(seg: ChunkSegments, B: int, Tq: int, Tk: int, device):
    """Piece of every query and key ([B, Tq] / [B, Tk], -1 for none) and the
    allowed pairs [B, Tq, Tk] (torch path)."""
    ids = []
    sides = ((seg.qstart, seg.qlen, Tq, seg.max_qlen), (seg.kstart, seg.klen, Tk, seg.max_klen))
    for start, length, T, longest in sides:
        out = torch.full((B, T), -1, dtype=torch.long, device=device)
        t = torch.arange(longest, device=device)
        valid = t[None, :] < length.to(device).long()[:, None]  # S x longest
        row = seg.row.to(device).long()[:, None].expand_as(valid)
        pos = start.to(device).long()[:, None] + t[None, :]
        piece = torch.arange(seg.num, device=device)[:, None].expand_as(valid)
        out[row[valid], pos[valid]] = piece[valid]
        ids.append(out)
    qseg, kseg = ids
    same = (qseg[:, :, None] == kseg[:, None, :]) & (qseg >= 0)[:, :, None]
    return qseg, same


@functools.lru_cache(maxsize=64)
def _rows_table(batch: int, seqlen: int, device: torch.device) -> SequenceTable:
    # one sequence per row: the same table for every call of a shape (every
    # layer of a step), read-only for the kernels
    return SequenceTable(
        row=torch.arange(batch, dtype=torch.int32, device=device),
        start=torch.zeros(batch, dtype=torch.int32, device=device),
        length=torch.full((batch,), seqlen, dtype=torch.int32, device=device),
        max_len=seqlen,
        cu_seqlens=None,
    )


def _check_cu_seqlens_type(cu_seqlens) -> None:
    """What both checks of cu_seqlens see without reading its values."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1:
        raise ValueError("cu_seqlens must be a 1-D integer tensor of document starts plus the total")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")


def _check_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    _check_cu_seqlens_type(cu_seqlens)
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


def _check_cu_seqlens_on_device(cu_seqlens: torch.Tensor, batch: int, seqlen: int, max_seqlen: int) -> torch.Tensor:
    """The checks of ``_check_cu_seqlens`` (and that no document is longer
    than ``max_seqlen``, which sizes the launch grid) as one asynchronous
    assertion on the tensor's device: the host does not wait for it, and a
    bad ``cu_seqlens`` fails at the next synchronisation with this message."""
    _check_cu_seqlens_type(cu_seqlens)
    if cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must hold at least the start 0 and the total batch * seqlen")
    cu = cu_seqlens.detach().to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    row_ends = torch.arange(1, batch, dtype=torch.int64, device=cu.device) * seqlen
    ok = (cu[0] == 0) & (cu[-1] == batch * seqlen) & (lengths >= 0).all() & (lengths.max() <= max_seqlen)
    if row_ends.numel():
        # cu is sorted (if it is not, ok is already false): a binary search
        # finds the row ends without torch.isin, whose unique() would sync
        at = torch.searchsorted(cu, row_ends).clamp_max(cu.numel() - 1)
        ok = ok & (cu[at] == row_ends).all()
    torch._assert_async(ok, f"cu_seqlens must start at 0, end at batch * seqlen = {batch * seqlen}, be "
                            f"non-decreasing, contain every row boundary and hold no document longer than "
                            f"max_seqlen = {max_seqlen}")
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
    """delta per (sequence, query head), float32 [S, Hq]; None when ACP is off
    or the call's longest sequence is shorter than ``acp.min_seqlen``."""
    if acp is None:
        return None
    if not isinstance(acp, AcpConfig):
        raise TypeError(f"acp must be an AcpConfig or None, got {type(acp).__name__}")
    if seqs.max_len < acp.min_seqlen:
        return None
    S, Hq = seqs.num, qb.shape[2]
    if acp.logit_bound is None:
        seq_index = None
        if seqs.cu_seqlens is not None:
            seq_index = token_document_ids(seqs.cu_seqlens, qb.shape[0], qb.shape[1])
        U = logit_bound_from_tensors(qb, kb, scale, seq_index, S)
    elif isinstance(acp.logit_bound, (int, float)):
        # depends on the sequences alone: computed once per table (every
        # layer of a micro-batch passes the same one), read-only after
        key = ("threshold", float(acp.logit_bound), float(acp.log_eps), Hq, str(qb.device))
        thr = seqs.derived.get(key)
        if thr is None:
            # filled on the device: a host scalar copied over would make the
            # host wait for the GPU on every call
            U = torch.full((S, Hq), float(acp.logit_bound), dtype=torch.float32, device=qb.device)
            thr = seqs.derived[key] = _threshold_of_bound(U, seqs, acp.log_eps)
        return thr
    else:
        U = torch.as_tensor(acp.logit_bound, dtype=torch.float32, device=qb.device)
        if U.dim() > 2 or (U.dim() >= 1 and U.shape[-1] not in (1, Hq)) or (U.dim() == 2 and U.shape[0] not in (1, S)):
            raise ValueError(f"logit_bound must be a scalar, [Hq] or [S, Hq] (Hq={Hq}, S={S}), got shape {tuple(U.shape)}")
        U = U.expand(S, Hq) if U.dim() else U.reshape(1, 1).expand(S, Hq)
    return _threshold_of_bound(U.to(qb.device), seqs, acp.log_eps)


def _threshold_of_bound(U: torch.Tensor, seqs: SequenceTable, log_eps: float) -> torch.Tensor:
    """delta [S, Hq] from the logit bound U [S, Hq] (on the kernels' device)."""
    # N: the most keys one query of the sequence can see = its length
    N = seqs.length.to(device=U.device, dtype=torch.float32)[:, None]
    return acp_threshold(U, N, log_eps).contiguous()


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
    max_seqlen: Optional[int] = None,
    softmax_scale: Optional[float] = None,
    acp: Optional[AcpConfig] = None,
    backend: str = "auto",
    return_stats: bool = False,
    precise_decay: bool = False,
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
        max_seqlen: optional length of the longest document (as in
            flash-attn's varlen functions).  Given together with a CUDA
            ``cu_seqlens``, the offsets are checked on the GPU and the call
            never waits for the device; without it they are read back once.
        softmax_scale: default 1 / sqrt(D).
        acp: ``AcpConfig`` to prune with Adaptive Computation Pruning, or None.
            The Triton kernels skip the tiles whose pairs all have a decay
            below the threshold and compute the others whole; the torch
            backend drops every such pair (acp.py; both lose at most eps of
            a query's attention mass when the bound holds).  Calls whose
            longest sequence is shorter than ``acp.min_seqlen`` run without
            pruning.
        backend: "auto" (Triton on CUDA, torch reference on CPU), "triton",
            or "torch".
        return_stats: also return ``AcpStats`` (None when ``acp`` is None;
            kept fraction 1 when the call is below ``acp.min_seqlen``).
        precise_decay: keep the cumulative decay c in float64 on the Triton
            backend.  By default c is a float32 prefix sum, which holds a
            decay c_i - c_j only to about |c| * 2^-24: at |c| ~ 1e5 (a long
            document with fast-forgetting heads) that is a ~0.6% error in
            the weights of neighbouring tokens.  Costs 4-15% of a fwd + bwd
            step (one run on an H200, 8k-16k tokens).  The torch backend
            always takes decays in float64.

    Returns:
        o in q's layout and dtype (and the stats if asked for).  Gradients
        flow to q, k, v and log_fgate.
    """
    backend = _resolve_backend(backend, q.device)
    qb, kb, vb, gb = _check_inputs(q, k, v, log_fgate, layout, backend)
    B, T, Hq, D = qb.shape
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D)
    seqs = SequenceTable.build(B, T, cu_seqlens, q.device, max_seqlen)
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
                c_s = _sequence_major_decay(cumulative_log_decay(gb.detach(), seqs.cu_seqlens, torch.float64), seqs)
                kstart = reference_block_boundaries(c_s, thr, bm, bn)
                stats = AcpStats(kept_tile_fraction(kstart, seqs.length, bm, bn), thr)
    else:
        from .triton_ops import ForgettingAttentionFunction

        out, tiles = ForgettingAttentionFunction.apply(qb, kb, vb, gb, seqs, scale, thr, bool(precise_decay))
        stats = None
        if return_stats and thr is not None:
            # counted by the boundary kernel: kept and causal tiles per (sequence, head)
            per_head = tiles.sum(0, dtype=torch.int64)
            stats = AcpStats(per_head[:, 0].float() / per_head[:, 1].clamp_min(1).float(), thr)

    if return_stats and acp is not None and thr is None:  # below acp.min_seqlen: nothing pruned
        stats = AcpStats(torch.ones(Hq, dtype=torch.float32, device=q.device), None)
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
    segments: Optional[ChunkSegments] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One query chunk against one key/value chunk (context-parallel block).

    q: [B, Tq, Hq, D], k/v: [B, Tk, Hkv, D] (bshd views; any strides with a
    unit last stride).  c_q: [B, Hq, Tq], c_k: [B, Hq, Tk] *global*
    cumulative decays of those tokens, float32, or float64 for precise
    decays (see ``forgetting_attention``'s ``precise_decay``: float32 holds
    a decay only to |c| * 2^-24, and a global c grows with the whole
    sequence).  causal=True for the diagonal chunk
    (same tokens); otherwise every key precedes every query.
    acp_threshold: [B, Hq] or None.
    segments: packed documents, ``ChunkSegments`` of this pair (on q's
    device for the Triton backend); then a query attends only to the keys of
    its piece and ``acp_threshold`` is per piece, [S, Hq].  The decays stay
    global: c_i - c_j of one document sums that document's gates only.

    Returns (out [B, Tq, Hq, D] in q's dtype, lse [B, Hq, Tq] float32, natural
    log; -inf where every key was pruned).  No autograd: pair it with
    ``attention_chunk_backward``.
    """
    backend = _resolve_backend(backend, q.device)
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError("a causal (diagonal) chunk needs as many queries as keys")
    if segments is not None:
        _check_segments(segments, q.shape[0], q.shape[1], k.shape[1], q.shape[2], causal, acp_threshold)
    if backend == "torch":
        thr, same_doc, query_thr = _torch_chunk_masks(segments, acp_threshold, q, k)
        with torch.no_grad():
            out, lse = naive_attention_chunk(
                q, k, v, c_q.permute(0, 2, 1), c_k.permute(0, 2, 1), causal=causal,
                softmax_scale=softmax_scale, acp_threshold=thr, same_doc=same_doc, query_threshold=query_thr,
            )
        return out, lse.float()
    from .triton_ops import chunk_forward

    return chunk_forward(q, k, v, c_q, c_k, causal, softmax_scale, acp_threshold, segments)


def _check_query_rows(query_rows, q, k, acc_rows, acc_name) -> None:
    if query_rows.dim() != 1 or query_rows.numel() != k.shape[0] or query_rows.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"query_rows must be int32/int64 [{k.shape[0]}] (one query row per key row), "
                         f"got {query_rows.dtype} {tuple(query_rows.shape)}")
    if query_rows.device != q.device:
        raise ValueError("query_rows must be on the queries' device")
    if acc_rows != q.shape[0]:
        raise ValueError(f"{acc_name} must have the queries' batch size {q.shape[0]}, got {acc_rows}")


def attention_chunk_forward_into(
    acc_out: torch.Tensor,
    acc_lse: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    c_q: torch.Tensor,
    c_k: torch.Tensor,
    *,
    query_rows: torch.Tensor,
    causal: bool,
    softmax_scale: float,
    acp_threshold: Optional[torch.Tensor] = None,
    backend: str = "auto",
    segments: Optional[ChunkSegments] = None,
) -> None:
    """``attention_chunk_forward`` of selected query rows, merged in place.

    Key row n (of k, v [N, Tk, Hkv, D], c_k [N, Hq, Tk]) pairs with query row
    ``query_rows[n]`` of q [Bq, Tq, Hq, D] / c_q [Bq, Hq, Tq]; rows are
    distinct.  The result is merged (log-sum-exp rule) into acc_out [Bq, Tq,
    Hq, D] (float32 with the Triton backend) and acc_lse [Bq, Hq, Tq], which
    hold the partial result over other keys (start: 0 and -inf).  A ring
    step then reads no gathered copy of the queries and writes no partial
    output: the kernel merges in its epilogue.  acp_threshold / segments
    are per key row / piece as in ``attention_chunk_forward``.
    """
    backend = _resolve_backend(backend, q.device)
    _check_query_rows(query_rows, q, k, acc_out.shape[0], "acc_out")
    if acc_out.shape != q.shape or acc_lse.shape != (q.shape[0], q.shape[2], q.shape[1]):
        raise ValueError(f"acc_out / acc_lse must be {tuple(q.shape)} / {(q.shape[0], q.shape[2], q.shape[1])}")
    if backend == "torch":
        rows = query_rows.long()
        out, lse = attention_chunk_forward(
            q.index_select(0, rows), k, v, c_q.index_select(0, rows), c_k, causal=causal,
            softmax_scale=softmax_scale, acp_threshold=acp_threshold, backend=backend, segments=segments)
        o_new, lse_new = merge_partial_attention(acc_out.index_select(0, rows), acc_lse.index_select(0, rows),
                                                 out, lse)
        acc_out.index_copy_(0, rows, o_new.to(acc_out.dtype))
        acc_lse.index_copy_(0, rows, lse_new.to(acc_lse.dtype))
        return
    if acc_out.dtype != torch.float32 or acc_lse.dtype != torch.float32 or acc_out.stride(-1) != 1:
        raise ValueError("acc_out / acc_lse must be float32 (acc_out with a unit last stride)")
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError("a causal (diagonal) chunk needs as many queries as keys")
    if segments is not None:
        _check_segments(segments, k.shape[0], q.shape[1], k.shape[1], q.shape[2], causal, acp_threshold)
    from .triton_ops import chunk_forward_into

    chunk_forward_into(acc_out, acc_lse, q, k, v, c_q, c_k, query_rows, causal, softmax_scale, acp_threshold,
                       segments)


def attention_row_delta(out: torch.Tensor, do: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """do . out of every query: [B, H, T] float32 from bshd out and do (the
    row term of the softmax backward, computed once per query chunk for
    ``attention_chunk_backward_into``)."""
    if _resolve_backend(backend, out.device) == "torch":
        cd = torch.float64 if torch.float64 in (out.dtype, do.dtype) else torch.float32
        return (do.to(cd) * out.to(cd)).sum(-1).permute(0, 2, 1).contiguous()
    from .triton_ops import row_delta

    return row_delta(out, do)


def _torch_chunk_masks(segments, acp_threshold, q, k):
    """(row threshold, document mask, per-query threshold) for the torch path:
    with document pieces the mask comes from them and the threshold becomes
    per query (its piece's); without, the row threshold passes through."""
    if segments is None:
        return acp_threshold, None, None
    qseg, same_doc = _segment_masks(segments, q.shape[0], q.shape[1], k.shape[1], q.device)
    query_thr = _query_threshold(acp_threshold, qseg) if acp_threshold is not None else None
    return None, same_doc, query_thr


def _query_threshold(thr: torch.Tensor, qseg: torch.Tensor) -> torch.Tensor:
    """Per-piece thresholds [S, Hq] -> per query [B, Tq, Hq] (queries in no
    piece are masked anyway)."""
    if thr.shape[0] == 0:
        return thr.new_zeros(*qseg.shape, thr.shape[1])
    return thr[qseg.clamp_min(0)]


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
    segments: Optional[ChunkSegments] = None,
):
    """Gradients of one chunk pair given the *merged* output and lse.

    ``out`` and ``lse`` are the final (merged over all key chunks) attention
    output and log-sum-exp of the query chunk, as in FlashAttention's ring
    backward.  ``segments`` / ``acp_threshold`` as for
    ``attention_chunk_forward``.  Returns (dq, dk, dv, dc_q [B, Hq, Tq],
    dc_k [B, Hq, Tk]) where dc are float32 gradients with respect to the
    global decays c_q and c_k.
    """
    backend = _resolve_backend(backend, q.device)
    if segments is not None:
        _check_segments(segments, q.shape[0], q.shape[1], k.shape[1], q.shape[2], causal, acp_threshold)
    if backend == "torch":
        thr, same_doc, query_thr = _torch_chunk_masks(segments, acp_threshold, q, k)
        return _torch_chunk_backward(do, q, k, v, c_q, c_k, out, lse, causal, softmax_scale, thr,
                                     same_doc, query_thr)
    from .triton_ops import chunk_backward

    return chunk_backward(do, q, k, v, c_q, c_k, out, lse, causal, softmax_scale, acp_threshold, segments)


def attention_chunk_backward_into(
    dq_acc: torch.Tensor,
    dcq_acc: torch.Tensor,
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    c_q: torch.Tensor,
    c_k: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    *,
    query_rows: torch.Tensor,
    causal: bool,
    softmax_scale: float,
    acp_threshold: Optional[torch.Tensor] = None,
    backend: str = "auto",
    segments: Optional[ChunkSegments] = None,
    kv_grad_dtype: Optional[torch.dtype] = None,
):
    """``attention_chunk_backward`` of selected query rows, accumulating.

    Rows as in ``attention_chunk_forward_into``: do, q [Bq, Tq, Hq, D], c_q,
    the merged lse and delta (``attention_row_delta`` of the merged output)
    [Bq, Hq, Tq] are read in place at ``query_rows``; the query gradients
    are added to dq_acc [Bq, Tq, Hq, D] and dcq_acc [Bq, Hq, Tq] (float32
    with the Triton backend).  Returns (dk, dv, dc_k [N, Hq, Tk] float32) of
    the N key rows; with ``kv_grad_dtype`` dk and dv are contiguous in that
    dtype (float32 spares the caller a conversion before accumulating),
    else in k's dtype.
    """
    backend = _resolve_backend(backend, q.device)
    _check_query_rows(query_rows, q, k, dq_acc.shape[0], "dq_acc")
    if dq_acc.shape != q.shape or dcq_acc.shape != lse.shape or delta.shape != lse.shape:
        raise ValueError("dq_acc must be shaped like q, dcq_acc and delta like lse")
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError("a causal (diagonal) chunk needs as many queries as keys")
    if segments is not None:
        _check_segments(segments, k.shape[0], q.shape[1], k.shape[1], q.shape[2], causal, acp_threshold)
    if backend == "torch":
        rows = query_rows.long()
        thr, same_doc, query_thr = _torch_chunk_masks(segments, acp_threshold, q.index_select(0, rows), k)
        dq, dk, dv, dc_q, dc_k = _torch_chunk_backward(
            do.index_select(0, rows), q.index_select(0, rows), k, v, c_q.index_select(0, rows), c_k, None,
            lse.index_select(0, rows), causal, softmax_scale, thr, same_doc, query_thr,
            delta=delta.index_select(0, rows))
        dq_acc.index_add_(0, rows, dq.to(dq_acc.dtype))
        dcq_acc.index_add_(0, rows, dc_q.to(dcq_acc.dtype))
        dt = kv_grad_dtype or k.dtype
        return dk.to(dt).contiguous(), dv.to(dt).contiguous(), dc_k
    if dq_acc.dtype != torch.float32 or dcq_acc.dtype != torch.float32 or dq_acc.stride(-1) != 1:
        raise ValueError("dq_acc / dcq_acc must be float32 (dq_acc with a unit last stride)")
    from .triton_ops import chunk_backward_into

    return chunk_backward_into(dq_acc, dcq_acc, do, q, k, v, c_q, c_k, lse, delta, query_rows, causal,
                               softmax_scale, acp_threshold, segments, kv_grad_dtype)


def _torch_chunk_backward(do, q, k, v, c_q, c_k, out, lse, causal, scale, thr, same_doc=None, query_thr=None,
                          delta=None, prune_decay=None):
    # prune_decay: what the threshold is compared with instead of the pair's
    # decay (naive.tile_rule_decay: a kernel's tile rule)
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, Tq, Hq, D = q.shape
    group = Hq // k.shape[2]
    qf = q.to(cd).permute(0, 2, 1, 3)
    kf = k.to(cd).repeat_interleave(group, dim=2).permute(0, 2, 1, 3)
    vf = v.to(cd).repeat_interleave(group, dim=2).permute(0, 2, 1, 3)
    dof = do.to(cd).permute(0, 2, 1, 3)
    decay = pair_decay(c_q, c_k, cd)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale + decay
    keep = pair_keep(decay, causal, same_doc, thr, query_thr, prune_decay)
    lse_c = lse.to(cd)
    safe = torch.where(torch.isfinite(lse_c), lse_c, torch.zeros_like(lse_c))
    p = torch.where(keep, torch.exp(s - safe[..., None]), torch.zeros_like(s))
    dv = torch.matmul(p.transpose(-1, -2), dof)
    dp = torch.matmul(dof, vf.transpose(-1, -2))
    delta = (attention_row_delta(out.to(cd), do.to(cd), backend="torch") if delta is None else delta).to(cd)
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
