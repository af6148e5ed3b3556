"""The ring's schedule: which chunk pairs to compute and which KV to move.

Tokens live in 2P global chunks (zigzag: rank r holds chunks r and 2P-1-r).
After the global-decay all-gather every rank knows c at the first and last
token of every chunk, per batch row and query head.  D_ij = c_i - c_j is
largest at (first query, last key) of a pair of chunks, so a pair whose
largest decay is below the ACP threshold holds only pruned weights and is
skipped as a whole (DESIGN.md section 2).  Every rank evaluates the same table,
so every rank also knows, without asking, what every other rank will send it.

Sub-blocks.  Each chunk is cut into ``nsub`` equal sub-blocks.  c falls
along the keys, so for a (query chunk, key chunk) pair the key sub-blocks
that survive pruning form a suffix of the key chunk: every query of the chunk
drops the leading ones (its decays are below the first query's).  Keys are
sent and attended from that suffix on, so a head that forgets within a
chunk's length moves only the tail of the previous chunk.

Unit of transfer: one sub-block of one KV chunk, one batch row and one
key/value head (``[2 (k, v), Ts, D]`` plus the decays of its Ts tokens for
the query heads that share it).  Unit id u = ((j * nsub + s) * B + b) * Hkv
+ h, j = 0 for the origin rank's first chunk and 1 for its second.

Two rings, one per chunk kind.  Causal attention wants the chunks *before*
a query chunk: rank r's first chunk (r) follows rank r-1's first chunk, but
its second chunk (2P-1-r) follows rank r+1's second chunk.  So first-chunk
units travel forward (r -> r+1) and second-chunk units travel backward
(r -> r-1): with fast-forgetting gates each unit makes one hop instead of
going round the ring.  At step s rank r holds the first-chunk units of
origin r - s and the second-chunk units of origin r + s that some rank still
ahead (in that unit's direction) wants, and forwards only those; both rings
stop after the last step at which anything is wanted.

Packed documents add a document mask to the table (documents.py): an
off-diagonal pair only attends within the document of the query chunk's
first token, so key sub-blocks ending before that document starts are
dropped like pruned ones, and each pair carries its document pieces for the
kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from fox_megatron.kernels import ChunkSegments

from .documents import RingDocuments
from .layout import h2d, zigzag_chunks

__all__ = ["chunk_need_table", "RingPlan", "PairWork"]


def _concat_pairs(calls: List["PairWork"], causal: bool) -> "PairWork":
    """Two calls (one per query chunk) as one: rows stacked, the shorter key
    rows padded in front with hidden keys (their first unit repeated)."""
    m = max(pw.units.shape[1] for pw in calls)
    units, leads = [], []
    for pw in calls:
        n, k = pw.units.shape
        units.append(torch.cat([pw.units[:, :1].expand(n, m - k), pw.units], 1))
        lead = pw.lead if pw.lead is not None else torch.zeros(n, dtype=torch.long)
        leads.append(lead + (m - k))
    lead = torch.cat(leads)
    return PairWork(-1, calls[0].kj if calls[0].kj == calls[1].kj else -1, causal,
                    torch.cat([pw.rows for pw in calls]), torch.cat(units), torch.cat([pw.sub for pw in calls]),
                    lead=lead if bool((lead > 0).any()) else None)


def chunk_need_table(
    c_first: torch.Tensor,
    c_last: torch.Tensor,
    threshold: Optional[torch.Tensor],
    documents: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """[B, H, 2P(query chunk), 2P(key chunk), nsub] bool: which key sub-blocks
    must the pair attend to?

    c_first: [B, H, 2P] decay at each chunk's first token; c_last:
    [B, H, 2P, nsub] (or [B, H, 2P] for nsub = 1) at each sub-block's last
    token, or [B, H, 2P (query chunk), 2P, nsub] when it depends on the
    query chunk (packed documents: decays relative to a per-document base).
    Causal pairs only (key chunk <= query chunk).  The diagonal is always
    kept whole (its largest decay is 0, at i = j).  With
    ``threshold`` [B, H] (ACP delta), or [B, H, 2P] (one per query chunk:
    packed documents), a key sub-block is dropped when
    c[first q] - c[last k of the sub-block] < delta, compared in the dtype of
    the decays, as the kernel compares them.  ``documents`` [B, 2P, 2P, nsub]
    bool (packed documents, ``RingDocuments.need_mask``): sub-blocks whose
    keys no query of the chunk may see are dropped too.  Both drop a prefix
    of each key chunk, so the kept sub-blocks stay a suffix.
    """
    if c_last.dim() == 3:
        c_last = c_last[..., None]
    if c_last.dim() == 4:
        c_last = c_last[..., None, :, :]  # the same for every query chunk
    B, H, _, C, nsub = c_last.shape
    idx = torch.arange(C, device=c_first.device)
    causal = idx[None, :] <= idx[:, None]  # [q, k]
    need = causal[:, :, None].expand(B, H, C, C, nsub).clone()
    if threshold is not None:
        largest = c_first[..., :, None, None] - c_last  # B H q k s
        thr = threshold.to(largest.dtype)
        thr = thr[..., None, None, None] if thr.dim() == 2 else thr[..., :, None, None]
        diag = (idx[None, :] == idx[:, None])[:, :, None]
        need &= (largest >= thr) | diag
    if documents is not None:
        need &= documents.to(need.device)[:, None]
    return need


@dataclass
class PairWork:
    """One kernel call of a ring step: a local query chunk against a key
    chunk of the visiting origin, or merged (``RingPlan.merge_pairs``) both
    query chunks and / or both earlier key chunks."""

    qi: int  # 0/1: which of this rank's chunks the queries are (-1: both, one call)
    kj: int  # 0/1: which of the origin's chunks the keys are (-1: both, one call)
    causal: bool
    # int64 [N] query rows qi * B * Hq + b * Hq + h (both query chunks of the
    # rank are one tensor of rows, so one call can serve both)
    rows: torch.Tensor
    units: torch.Tensor  # int64 [N, m] unit ids of the key sub-blocks each row reads (a suffix)
    sub: torch.Tensor  # int64 [N] h % group: which decay row of the unit
    # packed documents: the pair's document pieces (rows index ``rows``) and
    # the query head of each piece, for its document's ACP threshold
    segments: Optional[ChunkSegments] = None
    seg_heads: Optional[torch.Tensor] = None  # int64 [S]
    # merged pairs (rows whose kept suffixes differ, one kernel call):
    # leading sub-blocks of ``units`` a row does not hold (they repeat its
    # first kept unit, and the ring hides their keys behind the decay)
    lead: Optional[torch.Tensor] = None  # int64 [N]
    _on_device: dict = field(default_factory=dict, repr=False)

    def on_device(self, device):
        """(rows, units, sub) on ``device``, copied once per plan (the
        forward and backward passes share the plan's pairs)."""
        key = ("rows", str(device))
        if key not in self._on_device:
            self._on_device[key] = (h2d(self.rows, device), h2d(self.units, device), h2d(self.sub, device))
        return self._on_device[key]

    def hidden_keys(self, device, Ts: int) -> Optional[torch.Tensor]:
        """bool [N, m * Ts]: the gathered keys a row does not hold (the
        leading ``lead`` sub-blocks), on ``device``; None when every row
        holds its whole suffix."""
        if self.lead is None:
            return None
        key = ("hidden", str(device), Ts)
        if key not in self._on_device:
            m = self.units.shape[1]
            hidden = torch.arange(m * Ts)[None, :] < (self.lead * Ts)[:, None]
            self._on_device[key] = h2d(hidden, device)
        return self._on_device[key]

    def device_segments(self, device):
        """(segments, heads) on ``device``, copied once per plan."""
        key = ("segments", str(device))
        if key not in self._on_device:
            self._on_device[key] = (self.segments.to(device), h2d(self.seg_heads, device))
        return self._on_device[key]


@dataclass
class RingPlan:
    """Everything the ring does, decided before it starts (host side)."""

    cp_size: int
    rank: int
    batch: int
    q_heads: int
    kv_heads: int
    need: torch.Tensor  # [B, Hq, 2P, 2P, nsub] bool, cpu
    # carry[o][s]: sorted unit ids of origin o held at step s (first-chunk
    # units by rank o+s, second-chunk units by rank o-s)
    carry: List[List[torch.Tensor]] = field(default_factory=list)
    # wanted[o][r]: sorted unit ids of origin o that rank r computes with
    wanted: List[List[torch.Tensor]] = field(default_factory=list)
    last_step: int = 0
    # ring direction of second-chunk units: -1 (backward, the default) or +1
    # (forward with the first chunks, a single-direction ring as in
    # ring-flash-attn: every step then computes exactly two chunk pairs
    # per rank in the dense case, while two directions move fewer bytes)
    hi_dir: int = -1
    # packed documents (None: whole rows); the pairs carry document pieces
    documents: Optional[RingDocuments] = None
    # few kernel calls per step for all rows, whatever their kept suffixes
    # (True: the diagonals in one call, the earlier key chunks in another),
    # or one call per (query chunk, key chunk) and suffix length (False)
    merge_pairs: bool = True
    # the kernels prune hidden keys (an ACP threshold is given): calls of
    # different key lengths may then share a launch, the shorter rows padded
    # with hidden keys; without pruning, padding would be computed
    hidden_pruned: bool = False
    _pairs: dict = field(default_factory=dict, repr=False)

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads

    @property
    def sub_blocks(self) -> int:
        return self.need.shape[-1]

    @property
    def num_units(self) -> int:
        return 2 * self.sub_blocks * self.batch * self.kv_heads

    @staticmethod
    def build(need: torch.Tensor, rank: int, kv_heads: int, two_way: bool = True,
              documents: Optional[RingDocuments] = None, merge_pairs: bool = True,
              hidden_pruned: bool = False) -> "RingPlan":
        need = need.detach().to("cpu")
        if need.dim() == 4:
            need = need[..., None]
        B, Hq, C, _, nsub = need.shape
        P = C // 2
        g = Hq // kv_heads
        plan = RingPlan(P, rank, B, Hq, kv_heads, need, hi_dir=-1 if two_way else 1, documents=documents,
                        merge_pairs=merge_pairs, hidden_pruned=hidden_pruned)
        # wanted_mask[o][r]: [2, nsub, B, Hkv] bool
        wanted_mask = []
        for o in range(P):
            row = []
            for r in range(P):
                m = torch.zeros(2, nsub, B, kv_heads, dtype=torch.bool)
                for j, kc in enumerate(zigzag_chunks(o, P)):
                    for qc in zigzag_chunks(r, P):
                        # [B, Hq, nsub] -> any query head of the group
                        m[j] |= need[:, :, qc, kc].view(B, kv_heads, g, nsub).any(2).permute(2, 0, 1)
                row.append(m)
            wanted_mask.append(row)
        ids = lambda m: torch.nonzero(m.reshape(-1)).flatten()  # noqa: E731
        plan.wanted = [[ids(wanted_mask[o][r]) for r in range(P)] for o in range(P)]
        last = 0
        for o in range(P):
            carry = [torch.arange(plan.num_units)]  # step 0: the origin holds all
            acc = torch.zeros(2, nsub, B, kv_heads, dtype=torch.bool)
            per_step = [None] * (P + 1)
            per_step[P] = acc.clone()
            for s in range(P - 1, 0, -1):
                # first chunk (j = 0) forward to o+s, second (j = 1) backward to o-s
                acc[0] |= wanted_mask[o][(o + s) % P][0]
                acc[1] |= wanted_mask[o][(o + plan.hi_dir * s) % P][1]
                per_step[s] = acc.clone()
            for s in range(1, P):
                carry.append(ids(per_step[s]))
                if carry[s].numel():
                    last = max(last, s)
            carry.append(ids(per_step[P]))
            plan.carry.append(carry)
        plan.last_step = last
        return plan

    def origin(self, step: int, j: int, rank: Optional[int] = None) -> int:
        """Origin of the chunk-j units held by ``rank`` (default: this rank) at ``step``."""
        rank = self.rank if rank is None else rank
        return (rank - self.direction(j) * step) % self.cp_size

    def direction(self, j: int) -> int:
        """+1: chunk-j units travel r -> r+1; -1: r -> r-1."""
        return 1 if j == 0 else self.hi_dir

    def chunk_ids(self, ids: torch.Tensor, j: int) -> torch.Tensor:
        """The chunk-j units among sorted unit ids."""
        half = self.num_units // 2
        return ids[ids >= half] if j else ids[ids < half]

    def held(self, step: int, rank: Optional[int] = None) -> torch.Tensor:
        """Sorted unit ids ``rank`` holds at ``step`` (first then second chunk)."""
        if step == 0:
            return torch.arange(self.num_units)
        return torch.cat([self.chunk_ids(self.carry[self.origin(step, j, rank)][step], j) for j in (0, 1)])

    def pairs(self, step: int) -> List[PairWork]:
        """What this rank computes at ``step`` (with the origin's KV); the
        forward and backward passes share one list per step."""
        if step not in self._pairs:
            self._pairs[step] = self._build_pairs(step)
        return self._pairs[step]

    def _build_pairs(self, step: int) -> List[PairWork]:
        P, B, Hq = self.cp_size, self.batch, self.q_heads
        merged = self.merge_pairs and self.documents is None
        out = []
        causal, earlier_calls = [], []
        for qi, qc in enumerate(zigzag_chunks(self.rank, P)):
            earlier = []  # (key chunk, kj, start) of key chunks wholly before qc
            for kj in (0, 1):
                kc = zigzag_chunks(self.origin(step, kj), P)[kj]
                if kc > qc:
                    continue
                nsub = self.sub_blocks
                # leading sub-blocks pruned for each (b, h); nsub = whole pair skipped
                start = nsub - self.need[:, :, qc, kc].sum(-1)  # B Hq
                if merged:
                    if kc < qc:
                        earlier.append((kc, kj, start.reshape(-1)))
                    else:
                        causal.append(self._merged_pair(qi, [kj], True, start.reshape(-1)))
                    continue
                for ks in torch.unique(start).tolist():
                    if ks >= nsub:
                        continue
                    local = torch.nonzero((start == ks).reshape(-1)).flatten()
                    b, hh = local // Hq, local % Hq
                    blocks = torch.arange(ks, nsub)
                    units = self._unit_ids(kj, blocks[None, :], b[:, None], hh[:, None])
                    pw = PairWork(qi, kj, kc == qc, qi * B * Hq + local, units, hh % self.group)
                    if self.documents is not None:
                        pw.segments = self.documents.segments(qc, kc, ks, b)
                        pw.seg_heads = hh[pw.segments.row.long()]
                    out.append(pw)
            if earlier:
                earlier_calls += self._earlier_chunks_pairs(qi, earlier)
        if not merged:
            return out
        # both query chunks in one launch per kind: the diagonals (whole
        # chunks, equal lengths), and the pairs of key chunks before them
        for calls, is_causal in ((causal, True), (earlier_calls, False)):
            calls = [pw for pw in calls if pw is not None]
            # (two calls of one query chunk would write the same rows: never one launch)
            if (len(calls) == 2 and calls[0].qi != calls[1].qi
                    and (self.hidden_pruned or calls[0].units.shape[1] == calls[1].units.shape[1])):
                calls = [_concat_pairs(calls, is_causal)]
            out += calls
        return out

    def _earlier_chunks_pairs(self, qi: int, earlier) -> List[Optional[PairWork]]:
        """The key chunks wholly before query chunk ``qi`` (one or two) in one
        call: their sub-blocks in sequence order, so c keeps falling along a
        row's keys and its kept keys stay one suffix (a row that keeps any
        key of the earlier chunk keeps all of the later; a table where that
        fails gets a call per key chunk)."""
        earlier = sorted(earlier, key=lambda e: e[0])
        nsub = self.sub_blocks
        groups = [earlier]
        if len(earlier) == 2:
            (_, _, s_a), (_, _, s_b) = earlier
            if bool(((s_a < nsub) & (s_b > 0)).any()):
                groups = [[e] for e in earlier]
        calls = []
        for grp in groups:
            start = grp[0][2]
            if len(grp) == 2:
                start = torch.where(start < nsub, start, nsub + grp[1][2])
            calls.append(self._merged_pair(qi, [kj for _, kj, _ in grp], False, start))
        return calls

    def _unit_ids(self, kj, blocks, b, hh):
        return ((kj * self.sub_blocks + blocks) * self.batch + b) * self.kv_heads + hh // self.group

    def _merged_pair(self, qi: int, kjs: List[int], causal: bool, start: torch.Tensor) -> Optional[PairWork]:
        """All rows of query chunk ``qi`` against the key chunks ``kjs`` (one,
        or two in sequence order) in one call (whole rows, no documents).
        ``start`` [B * Hq]: each row's first kept sub-block, counted over the
        key chunks' sub-blocks in that order.

        Every row reads the longest kept suffix; a row that keeps less holds
        only its own suffix (its earlier sub-blocks never travel), so its
        leading entries point at its first kept unit and the ring gives those
        keys a decay that the ACP threshold drops.  The kernel then skips
        them as pruned tiles: the result equals per-suffix calls."""
        total = self.sub_blocks * len(kjs)
        local = torch.nonzero(start < total).flatten()
        if local.numel() == 0:
            return None
        start = start[local]
        ks = int(start.min())
        b, hh = local // self.q_heads, local % self.q_heads
        blocks = torch.maximum(torch.arange(ks, total)[None, :], start[:, None])  # N m
        kj = torch.tensor(kjs)[blocks // self.sub_blocks]
        units = self._unit_ids(kj, blocks % self.sub_blocks, b[:, None], hh[:, None])
        lead = start - ks
        rows = qi * self.batch * self.q_heads + local
        return PairWork(qi, kjs[0] if len(kjs) == 1 else -1, causal, rows, units, hh % self.group,
                        lead=lead if bool((lead > 0).any()) else None)

    def pair_counts(self) -> Tuple[int, int]:
        """(computed, causal) chunk-pair x (batch, head) counts over all ranks."""
        C = 2 * self.cp_size
        causal = C * (C + 1) // 2 * self.batch * self.q_heads
        return int(self.need.any(-1).sum()), causal

    def hidden_sub_blocks(self) -> int:
        """Key sub-blocks x rows that merged calls of this rank gather but hide."""
        return sum(int(pw.lead.sum()) for step in range(self.last_step + 1) for pw in self.pairs(step)
                   if pw.lead is not None)

    def kept_key_fraction(self) -> float:
        """Key sub-blocks attended over causal ones (all pairs, rows, heads)."""
        C = 2 * self.cp_size
        causal = C * (C + 1) // 2 * self.batch * self.q_heads * self.sub_blocks
        return float(self.need.sum()) / causal
