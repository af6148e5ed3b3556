"""The ring's schedule: which chunk pairs to compute and which KV to move.

Tokens live in 2P global chunks (zigzag: rank r holds chunks r and 2P-1-r).
After the global-decay all-gather every rank knows c at the first and last
token of every chunk, per batch row and query head.  D_ij = c_i - c_j is
largest at (first query, last key) of a pair of chunks, so a pair whose
largest decay is below the ACP threshold holds only pruned weights and is
skipped as a whole (DESIGN.md section 2).  Every rank evaluates the same table,
so every rank also knows, without asking, what every other rank will send it.

Unit of transfer: one KV chunk of one batch row and one key/value head
(``[2 (k, v), Tc, D]`` plus the decays of its Tc tokens for the query heads
that share it).  Unit id u = (j * B + b) * Hkv + h, j = 0 for the origin
rank's first chunk and 1 for its second.

Ring: at step s rank r holds the units of origin o = r - s (mod P) that are
still wanted by ranks o+s, ..., o+P-1; it forwards to r+1 only the ones some
rank after it still wants.  Those sets shrink with s, and the ring stops after
the last step at which any set is non-empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from .layout import zigzag_chunks

__all__ = ["chunk_need_table", "RingPlan", "PairWork"]


def chunk_need_table(
    c_first: torch.Tensor, c_last: torch.Tensor, threshold: Optional[torch.Tensor]
) -> torch.Tensor:
    """[B, H, 2P(query chunk), 2P(key chunk)] bool: must this pair be computed?

    Causal pairs only (key chunk <= query chunk).  The diagonal is always
    kept (its largest decay is 0, at i = j).  With ``threshold`` [B, H] (ACP
    delta) an off-diagonal pair is dropped when c[first q] - c[last k] < delta,
    compared in the dtype of the decays, as the kernel compares them.
    """
    B, H, C = c_first.shape
    idx = torch.arange(C, device=c_first.device)
    causal = idx[None, :] <= idx[:, None]  # [q, k]
    need = causal.expand(B, H, C, C).clone()
    if threshold is not None:
        largest = c_first[..., :, None] - c_last[..., None, :]
        keep = largest >= threshold.to(largest.dtype)[..., None, None]
        diag = idx[None, :] == idx[:, None]
        need &= keep | diag
    return need


@dataclass
class PairWork:
    """One (local query chunk, key chunk of the visiting origin) computation."""

    qi: int  # 0/1: which of this rank's chunks the queries are
    kj: int  # 0/1: which of the origin's chunks the keys are
    causal: bool
    rows: torch.Tensor  # int64 [N] query rows b * Hq + h that need this pair
    units: torch.Tensor  # int64 [N] unit id of the key/value chunk each row reads
    sub: torch.Tensor  # int64 [N] h % group: which decay row of the unit


@dataclass
class RingPlan:
    """Everything the ring does, decided before it starts (host side)."""

    cp_size: int
    rank: int
    batch: int
    q_heads: int
    kv_heads: int
    need: torch.Tensor  # [B, Hq, 2P, 2P] bool, cpu
    # carry[o][s]: sorted unit ids of origin o held by rank o+s at step s
    carry: List[List[torch.Tensor]] = field(default_factory=list)
    # wanted[o][r]: sorted unit ids of origin o that rank r computes with
    wanted: List[List[torch.Tensor]] = field(default_factory=list)
    last_step: int = 0

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads

    @property
    def num_units(self) -> int:
        return 2 * self.batch * self.kv_heads

    @staticmethod
    def build(need: torch.Tensor, rank: int, kv_heads: int) -> "RingPlan":
        need = need.detach().to("cpu")
        B, Hq, C, _ = need.shape
        P = C // 2
        g = Hq // kv_heads
        plan = RingPlan(P, rank, B, Hq, kv_heads, need)
        # units_needed[o][r]: [2, B, Hkv] bool
        wanted_mask = []
        for o in range(P):
            row = []
            for r in range(P):
                m = torch.zeros(2, B, kv_heads, dtype=torch.bool)
                for j, kc in enumerate(zigzag_chunks(o, P)):
                    for qc in zigzag_chunks(r, P):
                        # [B, Hq] -> any query head of the group
                        m[j] |= need[:, :, qc, kc].view(B, kv_heads, g).any(-1)
                row.append(m)
            wanted_mask.append(row)
        ids = lambda m: torch.nonzero(m.reshape(-1)).flatten()  # noqa: E731
        plan.wanted = [[ids(wanted_mask[o][r]) for r in range(P)] for o in range(P)]
        last = 0
        for o in range(P):
            carry = [torch.arange(plan.num_units)]  # step 0: the origin holds all
            acc = torch.zeros(2, B, kv_heads, dtype=torch.bool)
            per_step = [None] * (P + 1)
            per_step[P] = acc.clone()
            for s in range(P - 1, 0, -1):
                acc = acc | wanted_mask[o][(o + s) % P]
                per_step[s] = acc.clone()
            for s in range(1, P):
                carry.append(ids(per_step[s]))
                if carry[s].numel():
                    last = max(last, s)
            carry.append(ids(per_step[P]))
            plan.carry.append(carry)
        plan.last_step = last
        return plan

    def origin(self, step: int) -> int:
        return (self.rank - step) % self.cp_size

    def pairs(self, step: int) -> List[PairWork]:
        """What this rank computes at ``step`` (with the origin's KV)."""
        P, B, Hq, Hkv = self.cp_size, self.batch, self.q_heads, self.kv_heads
        o = self.origin(step)
        out = []
        h = torch.arange(Hq)
        for qi, qc in enumerate(zigzag_chunks(self.rank, P)):
            for kj, kc in enumerate(zigzag_chunks(o, P)):
                if kc > qc:
                    continue
                mask = self.need[:, :, qc, kc]  # B Hq
                rows = torch.nonzero(mask.reshape(-1)).flatten()
                if rows.numel() == 0:
                    continue
                b, hh = rows // Hq, rows % Hq
                units = (kj * B + b) * Hkv + hh // self.group
                out.append(PairWork(qi, kj, kc == qc, rows, units, hh % self.group))
        return out

    def pair_counts(self) -> Tuple[int, int]:
        """(computed, causal) chunk-pair x (batch, head) counts over all ranks."""
        C = 2 * self.cp_size
        causal = C * (C + 1) // 2 * self.batch * self.q_heads
        return int(self.need.sum()), causal
