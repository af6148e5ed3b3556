"""Pruning-aware ring attention for FoX over Megatron's zigzag layout.

The ring follows ring-flash-attn's design (zigzag layout, partial results
merged with the log-sum-exp rule, backward from the merged output and lse)
and adds Adaptive Computation Pruning at the granularity of chunk sub-blocks:

- compute skip: a (query chunk, key chunk, batch row, head) that the skip
  table prunes is never computed (skip_table.py);
- communication skip: KV travels as packed units (one sub-block of a chunk,
  one batch row, one KV head); a rank forwards only the units some rank
  further along still wants, and the ring stops once no unit is wanted
  anywhere;
- two directions: first chunks travel r -> r+1, second chunks r -> r-1,
  the directions in which causal attention needs them (skip_table.py);
- few kernel calls per ring step: rows (batch row, head) that keep
  different key suffixes read the longest one, and the keys a row does not
  hold are hidden behind a decay far below the threshold, so the kernels
  skip the tiles they fill and give them exactly zero weight in a tile they
  share with held keys (``RingPlan.merge_pairs``); both query chunks are one
  tensor of rows, so a step's two diagonal pairs are one call and its pairs
  with earlier key chunks another (a query chunk's two earlier key chunks
  concatenated in sequence order: c keeps falling along the keys);
- no copies of a call's query side: the chunk kernels read its query rows
  in place and merge into the running output and lse in their epilogue
  (forward), or add to the running dq and dc_q (backward, with do . out
  computed once); a pair's keys are one
  contiguous gather per row and their dK/dV come back in fp32 in the order
  of the ring's units (``attention_chunk_forward_into`` /
  ``attention_chunk_backward_into``);
- the same plan drives the backward ring.  dK/dV (and the gradient of the
  keys' decays) do not travel around the ring: rank r meets each origin's
  first chunks exactly once (at step r - o) and its second chunks exactly
  once (at step o - r), so right after that step its partial is complete
  and goes straight back to o, only for the units r used.

Communication overlaps compute: the next step's KV is posted (isend/irecv)
before this step's pairs are computed, so the buffer in flight and the one
being read are different tensors (double buffering).

Packed documents (``RingPlan.documents``): a pair attends within documents
only, through the chunk kernels' document pieces (``ChunkSegments``, built
once per plan); the ACP threshold is per document.  Key sub-blocks that no
query of a chunk shares a document with are out of the skip table, so they
are neither computed nor sent (documents.py).

``skip="dense"`` keeps the causal structure (ranks still only receive the
chunks they can attend to) but ignores the ACP table: the comparison point
for what pruning saves.  ``RingStats`` counts the bytes this rank sends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from fox_megatron.kernels import attention_chunk_backward_into, attention_chunk_forward_into, attention_row_delta

from .layout import h2d, p2p, wait_all
from .skip_table import RingPlan

__all__ = ["RingStats", "ring_attention"]

# gloo matches messages between two ranks by tag: ring tags (+10 for second
# chunks) stay clear of the halo's (halo.py)
_TAG_KV, _TAG_C, _TAG_GRAD, _TAG_C_GRAD = 31, 32, 33, 34
# c_k of keys hidden from a merged pair: c_q - c_k is then about -1e30, below
# every ACP threshold, and finite (no inf - inf in the kernels).  A kept tile
# computes them (the kernels skip whole tiles only), with weight exp(-1e30)
# = 0: hidden keys are a prefix of the pair's keys, so a row that sees one in
# a kept tile also sees that tile's held keys, which set its running maximum
_HIDDEN_KEY_DECAY = 1e30


@dataclass
class RingStats:
    """Bytes this rank sent, and what the ring computed, in the last call.

    fwd_kv_bytes / bwd_kv_bytes: KV (+ key decays) sent along the ring in the
    forward / backward pass; bwd_grad_bytes: dK/dV (+ key-decay gradients)
    returned to their origin ranks.  full_ring_kv_bytes: what a ring that
    sends every rank's whole KV P-1 times (as ring-flash-attn does) would send
    from this rank per pass, for reference.  pairs_computed / pairs_causal:
    (chunk pair, batch row, head) triples computed vs all causal ones, over
    all ranks.  kept_keys: key sub-blocks attended over causal ones.  steps:
    ring steps taken (P-1 for a full ring).  calls: chunk-kernel calls this
    rank makes per pass (forward, and again backward).
    """

    fwd_kv_bytes: int = 0
    bwd_kv_bytes: int = 0
    bwd_grad_bytes: int = 0
    full_ring_kv_bytes: int = 0
    pairs_computed: int = 0
    pairs_causal: int = 0
    kept_keys: float = 1.0
    steps: int = 0
    hidden_sub_blocks: int = 0
    calls: int = 0

    @property
    def total_bytes(self) -> int:
        return self.fwd_kv_bytes + self.bwd_kv_bytes + self.bwd_grad_bytes

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["total_bytes"] = self.total_bytes
        return d


def _to_rows(x: torch.Tensor) -> torch.Tensor:
    """[B, 2Tc, H, D] -> [2 * B * H, Tc, 1, D]: one row per (chunk i, b, h),
    row = i * B * H + b * H + h.  Both query chunks in one tensor, so one
    kernel call can serve pairs of either."""
    B, T, H, D = x.shape
    return x.reshape(B, 2, T // 2, H, D).permute(1, 0, 3, 2, 4).reshape(2 * B * H, T // 2, 1, D)


def _c_rows(c: torch.Tensor) -> torch.Tensor:
    """[B, H, 2Tc] -> [2 * B * H, 1, Tc], rows as in _to_rows."""
    B, H, T = c.shape
    return c.reshape(B, H, 2, T // 2).permute(2, 0, 1, 3).reshape(2 * B * H, 1, T // 2)


def _from_rows(rows: torch.Tensor, B: int, H: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of _to_rows -> [B, 2Tc, H, D] in ``dtype`` (the permute and
    the conversion in one copy)."""
    Tc, D = rows.shape[1], rows.shape[-1]
    out = torch.empty(B, 2 * Tc, H, D, dtype=dtype, device=rows.device)
    out.view(B, 2, Tc, H, D).copy_(rows.view(2, B, H, Tc, D).permute(1, 0, 3, 2, 4))
    return out


def _c_from_rows(rows: torch.Tensor, B: int, H: int) -> torch.Tensor:
    """Inverse of _c_rows -> [B, H, 2Tc]."""
    Tc = rows.shape[-1]
    return rows.view(2, B, H, Tc).permute(1, 2, 0, 3).reshape(B, H, 2 * Tc)


def _kv_units(k: torch.Tensor, v: torch.Tensor, nsub: int) -> torch.Tensor:
    """[B, 2Tc, Hkv, D] x2 -> [2 * nsub * B * Hkv, 2, Ts, D]
    (unit = ((j * nsub + s) * B + b) * Hkv + h); one strided copy each of
    k and v into the units."""
    B, T, Hkv, D = k.shape
    Ts = T // (2 * nsub)
    units = k.new_empty(2 * nsub * B * Hkv, 2, Ts, D)
    dst = units.view(2, nsub, B, Hkv, 2, Ts, D)  # j s b h kv t d
    for i, x in enumerate((k, v)):
        dst[:, :, :, :, i].copy_(x.view(B, 2, nsub, Ts, Hkv, D).permute(1, 2, 0, 4, 3, 5))
    return units


def _c_units(c: torch.Tensor, Hkv: int, nsub: int) -> torch.Tensor:
    """[B, Hq, 2Tc] -> [2 * nsub * B * Hkv, group, Ts]."""
    B, Hq, T = c.shape
    g, Ts = Hq // Hkv, T // (2 * nsub)
    return c.view(B, Hkv, g, 2, nsub, Ts).permute(3, 4, 0, 1, 2, 5).reshape(-1, g, Ts)


def _c_from_units(cu: torch.Tensor, B: int, Hkv: int, nsub: int) -> torch.Tensor:
    g, Ts = cu.shape[1], cu.shape[2]
    return cu.view(2, nsub, B, Hkv, g, Ts).permute(2, 3, 4, 0, 1, 5).reshape(B, Hkv * g, 2 * nsub * Ts)


def _kv_from_units(units: torch.Tensor, B: int, Hkv: int, nsub: int, dtype: torch.dtype):
    """Inverse of _kv_units -> k, v [B, 2Tc, Hkv, D] in ``dtype`` (the
    permute and the conversion in one copy each)."""
    Ts, D = units.shape[2], units.shape[3]
    src = units.view(2, nsub, B, Hkv, 2, Ts, D)  # j s b h kv t d
    out = []
    for i in range(2):
        x = torch.empty(B, 2 * nsub * Ts, Hkv, D, dtype=dtype, device=units.device)
        x.view(B, 2, nsub, Ts, Hkv, D).copy_(src[:, :, :, :, i].permute(2, 0, 1, 4, 3, 5))
        out.append(x)
    return out[0], out[1]


def _gather_keys(ring, pos, pw):
    """k, v [N, m*Ts, 1, D] and c_k [N, 1, m*Ts] of a pair's key suffix,
    plus the buffer positions [N, m] they came from."""
    _, units, sub = pw.on_device(pos.device)
    bi = pos[units]  # N m
    N, m = bi.shape
    Ts, D = ring.kv.shape[2], ring.kv.shape[3]
    # a row's m units are consecutive in the gathered tensor, so its keys
    # are one contiguous [m * Ts, D] block: one gather each for K and V
    flat = bi.reshape(-1)
    k = ring.kv[:, 0].index_select(0, flat).view(N, m * Ts, 1, D)
    v = ring.kv[:, 1].index_select(0, flat).view(N, m * Ts, 1, D)
    ck = ring.c[bi, sub[:, None]].reshape(N, 1, m * Ts)
    hidden = pw.hidden_keys(pos.device, Ts)
    if hidden is not None:
        # keys a row does not hold (merged pair): a decay below any ACP
        # threshold, so the kernels prune them (their tiles are skipped,
        # their gradients are zero)
        ck = ck.masked_fill(hidden[:, None, :], _HIDDEN_KEY_DECAY)
    return k, v, ck, bi


def _pair_threshold(pw, rows, thr, thr_rows, dev):
    """(segments, ACP threshold) of a pair for the chunk kernels: per row
    ([N, 1], ``rows`` on the device) for whole rows, per document piece
    ([S, 1]) when packed (thr is then [documents, Hq])."""
    if pw.segments is None:
        return None, (thr_rows.index_select(0, rows).unsqueeze(1) if thr_rows is not None else None)
    seg, heads = pw.device_segments(dev)
    return seg, (thr[seg.doc, heads].unsqueeze(1) if thr is not None else None)


def _positions(ids: torch.Tensor, n: int, device) -> torch.Tensor:
    pos = torch.full((n,), -1, dtype=torch.long)
    pos[ids] = torch.arange(ids.numel())
    return h2d(pos, device)


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


class _Ring:
    """KV movement shared by the forward and backward passes."""

    def __init__(self, plan: RingPlan, group, kv_local, c_local, stats_field, stats):
        self.plan, self.group = plan, group
        self.P, self.r = plan.cp_size, plan.rank
        self.kv, self.c = kv_local, c_local  # units of the origin currently held
        # templates for receive buffers (a rank may hold nothing at some step)
        self.kv_like, self.c_like = kv_local[:0], c_local[:0]
        self.held = torch.arange(plan.num_units)
        self.stats, self.field = stats, stats_field
        self.reqs = []
        self.sent = []
        self.incoming = None

    def post_next(self, step: int):
        """Send on what the neighbours need of the KV held at ``step``
        (first chunks forward, second chunks backward); receive the next
        step's units."""
        plan, nxt = self.plan, step + 1
        if nxt > plan.last_step:
            return
        P, r = self.P, self.r
        ops = []
        pos = self.positions()
        for j in (0, 1):
            peer = (r + plan.direction(j)) % P
            send_ids = plan.chunk_ids(plan.carry[plan.origin(step, j)][nxt], j)
            if send_ids.numel():
                bi = pos[h2d(send_ids, pos.device)]
                kv_msg, c_msg = self.kv.index_select(0, bi), self.c.index_select(0, bi)
                ops += [("send", kv_msg, peer, _TAG_KV + 10 * j), ("send", c_msg, peer, _TAG_C + 10 * j)]
                if self.stats is not None:
                    setattr(self.stats, self.field, getattr(self.stats, self.field) + _nbytes(kv_msg, c_msg))
        held = plan.held(nxt)
        n, n_lo = held.numel(), plan.chunk_ids(held, 0).numel()
        kv_in = self.kv_like.new_empty((n,) + tuple(self.kv_like.shape[1:]))
        c_in = self.c_like.new_empty((n,) + tuple(self.c_like.shape[1:]))
        for j, part in ((0, slice(0, n_lo)), (1, slice(n_lo, n))):
            peer = (r - plan.direction(j)) % P
            if part.stop > part.start:
                ops += [("recv", kv_in[part], peer, _TAG_KV + 10 * j), ("recv", c_in[part], peer, _TAG_C + 10 * j)]
        self.reqs = p2p(ops, self.group)
        # keep the outgoing messages alive until the sends complete
        self.sent = [t for kind, t, _, _ in ops if kind == "send"]
        self.incoming = (held, kv_in, c_in)

    def advance(self):
        wait_all(self.reqs)
        self.reqs, self.sent = [], []
        ids, kv_in, c_in = self.incoming
        self.held, self.kv, self.c = ids, kv_in, c_in
        self.incoming = None

    def positions(self):
        return _positions(self.held, self.plan.num_units, self.kv_like.device)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, c, thr, plan: RingPlan, group, scale, backend, stats):
        B, T, Hq, D = q.shape
        Hkv = k.shape[2]
        Tc = T // 2
        dev = q.device
        # the kernels read the queries of a call in place (rows of both
        # chunks) and merge into the running (out, lse) in their epilogue
        q_rows, c_rows = _to_rows(q), _c_rows(c)
        thr_rows = thr.reshape(B * Hq).repeat(2) if thr is not None and plan.documents is None else None
        acc_o = q.new_zeros(2 * B * Hq, Tc, 1, D, dtype=torch.float32)
        acc_lse = torch.full((2 * B * Hq, 1, Tc), float("-inf"), device=dev)
        if stats is not None:
            stats.fwd_kv_bytes = 0
        nsub = plan.sub_blocks
        # the backward reads KV as units too: saved instead of k and v (the
        # same bytes), so it does not lay them out again
        kv_units = _kv_units(k, v, nsub)
        ring = _Ring(plan, group, kv_units, _c_units(c, Hkv, nsub).contiguous(), "fwd_kv_bytes", stats)

        for step in range(plan.last_step + 1):
            ring.post_next(step)
            pairs = plan.pairs(step)
            if pairs:
                pos = ring.positions()
            for pw in pairs:
                rows = pw.on_device(dev)[0]
                k_sel, v_sel, ck, _ = _gather_keys(ring, pos, pw)
                seg, pair_thr = _pair_threshold(pw, rows, thr, thr_rows, dev)
                attention_chunk_forward_into(
                    acc_o, acc_lse, q_rows, k_sel, v_sel, c_rows, ck, query_rows=rows,
                    causal=pw.causal, softmax_scale=scale, acp_threshold=pair_thr, backend=backend, segments=seg,
                )
            if step < plan.last_step:
                ring.advance()

        out = _from_rows(acc_o, B, Hq, q.dtype)
        lse = _c_from_rows(acc_lse, B, Hq)
        ctx.save_for_backward(q, kv_units, c, thr if thr is not None else torch.empty(0), out, lse)
        ctx.kv_shape, ctx.kv_dtype = tuple(k.shape), k.dtype
        ctx.has_thr = thr is not None
        ctx.plan, ctx.group, ctx.scale, ctx.backend, ctx.stats = plan, group, scale, backend, stats
        if stats is not None:
            stats.steps = plan.last_step
            stats.pairs_computed, stats.pairs_causal = plan.pair_counts()
            stats.kept_keys = plan.kept_key_fraction()
            stats.full_ring_kv_bytes = (plan.cp_size - 1) * _nbytes(k, v, c)
            stats.hidden_sub_blocks = plan.hidden_sub_blocks()
            stats.calls = sum(len(plan.pairs(s)) for s in range(plan.last_step + 1))
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse=None):
        q, kv_units, c, thr, out, lse = ctx.saved_tensors
        thr = thr if ctx.has_thr else None
        plan, group, scale, backend, stats = ctx.plan, ctx.group, ctx.scale, ctx.backend, ctx.stats
        B, T, Hq, D = q.shape
        Hkv = ctx.kv_shape[2]
        g = Hq // Hkv
        Tc = T // 2
        dev = q.device
        P, r = plan.cp_size, plan.rank
        q_rows, do_rows = _to_rows(q), _to_rows(dout)
        lse_rows, c_rows = _c_rows(lse), _c_rows(c)
        # do . out of every query, once (not per pair)
        delta_rows = _c_rows(attention_row_delta(out, dout.contiguous(), backend=backend))
        thr_rows = thr.reshape(B * Hq).repeat(2) if thr is not None and plan.documents is None else None
        dq_rows = torch.zeros(2 * B * Hq, Tc, 1, D, device=dev)
        dc_rows = torch.zeros(2 * B * Hq, 1, Tc, device=dev)
        n_units = plan.num_units
        nsub = plan.sub_blocks
        Ts = Tc // nsub
        dkv_local = torch.zeros(n_units, 2, Ts, D, device=dev)
        dck_local = torch.zeros(n_units, g, Ts, device=dev)
        if stats is not None:
            stats.bwd_kv_bytes = 0
            stats.bwd_grad_bytes = 0
        ring = _Ring(plan, group, kv_units, _c_units(c, Hkv, nsub).contiguous(), "bwd_kv_bytes", stats)
        pending = []  # (requests, [(recv ids, dK/dV buffer, dc buffer)], ops) of gradient returns

        def land(items):
            for reqs, recvs, _ in items:
                wait_all(reqs)
                for ids, buf_kv, buf_c in recvs:
                    ids = h2d(ids, dev)
                    dkv_local.index_add_(0, ids, buf_kv)
                    dck_local.index_add_(0, ids, buf_c)

        for step in range(plan.last_step + 1):
            ring.post_next(step)
            pairs = plan.pairs(step)
            if step == 0:
                dkv, dck = dkv_local, dck_local
            else:
                dkv = torch.zeros((ring.held.numel(), 2, Ts, D), device=dev)
                dck = torch.zeros((ring.held.numel(), g, Ts), device=dev)
            if pairs:
                pos = ring.positions()
            for pw in pairs:
                rows, _, sub = pw.on_device(dev)
                k_sel, v_sel, ck, bi = _gather_keys(ring, pos, pw)
                seg, pair_thr = _pair_threshold(pw, rows, thr, thr_rows, dev)
                dk, dv, dckk = attention_chunk_backward_into(
                    dq_rows, dc_rows, do_rows, q_rows, k_sel, v_sel, c_rows, ck,
                    lse_rows, delta_rows, query_rows=rows,
                    causal=pw.causal, softmax_scale=scale, acp_threshold=pair_thr, backend=backend,
                    segments=seg, kv_grad_dtype=torch.float32,
                )
                # fp32 [N, m*Ts, 1, D] = [N*m, Ts, D] in unit order: added to
                # the units straight from the kernel's output
                N, m = bi.shape
                flat = bi.reshape(-1)
                dkv[:, 0].index_add_(0, flat, dk.view(N * m, Ts, D))
                dkv[:, 1].index_add_(0, flat, dv.view(N * m, Ts, D))
                dck.view(-1, Ts).index_add_(0, (bi * g + sub[:, None]).reshape(-1), dckk.float().reshape(N * m, Ts))
            land(pending)
            pending = []
            if step > 0:
                # this rank is done with the origins it met at this step:
                # return its partials for the units it used; receive ours
                # from the ranks that met us now
                ops, recvs = [], []
                pos = ring.positions()
                for j in (0, 1):
                    o = plan.origin(step, j)
                    send_ids = plan.chunk_ids(plan.wanted[o][r], j)
                    if send_ids.numel():
                        bi = pos[h2d(send_ids, dev)]
                        # two messages, not one concatenated copy
                        msg_kv, msg_c = dkv.index_select(0, bi), dck.index_select(0, bi)
                        ops += [("send", msg_kv, o, _TAG_GRAD + 10 * j), ("send", msg_c, o, _TAG_C_GRAD + 10 * j)]
                        if stats is not None:
                            stats.bwd_grad_bytes += _nbytes(msg_kv, msg_c)
                    src = (r + plan.direction(j) * step) % P
                    recv_ids = plan.chunk_ids(plan.wanted[r][src], j)
                    if recv_ids.numel():
                        n = recv_ids.numel()
                        buf_kv = torch.empty(n, 2, Ts, D, device=dev)
                        buf_c = torch.empty(n, g, Ts, device=dev)
                        ops += [("recv", buf_kv, src, _TAG_GRAD + 10 * j), ("recv", buf_c, src, _TAG_C_GRAD + 10 * j)]
                        recvs.append((recv_ids, buf_kv, buf_c))
                reqs = p2p(ops, group)
                pending.append((reqs, recvs, ops))  # ops: keeps the sent messages alive
            if step < plan.last_step:
                ring.advance()
        land(pending)

        dq = _from_rows(dq_rows, B, Hq, q.dtype)
        dk, dv = _kv_from_units(dkv_local, B, Hkv, nsub, ctx.kv_dtype)
        dc = _c_from_rows(dc_rows, B, Hq) + _c_from_units(dck_local, B, Hkv, nsub)
        return dq, dk, dv, dc.to(c.dtype), None, None, None, None, None, None


def ring_attention(q, k, v, c, threshold, plan: RingPlan, group, softmax_scale: float, backend: str = "auto",
                   stats: Optional[RingStats] = None):
    """Ring attention of this rank's zigzag queries against the whole sequence.

    q: [B, T_local, Hq, D], k/v: [B, T_local, Hkv, D] (bshd, T_local = two
    chunks), c: [B, Hq, T_local] global decays (differentiable; relative to
    a per-document base when packed), threshold: [B, Hq] ACP delta, or
    [documents, Hq] when ``plan.documents`` is set, or None; plan:
    ``RingPlan`` of this rank.
    Returns (out [B, T_local, Hq, D], lse [B, Hq, T_local]).
    """
    return _RingAttention.apply(q, k, v, c, threshold, plan, group, softmax_scale, backend, stats)
