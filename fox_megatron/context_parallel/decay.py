"""Global cumulative decay across context-parallel ranks (zigzag layout).

c_t = sum_{l <= t} log f_l over the *whole* sequence.  Each rank holds two
chunks (r and 2P-1-r): it scans them locally, all-gathers every chunk's total
(B x H x 2P numbers) and adds the sum of the chunks before each of its own.
The same all-gather also carries each chunk's first gate and its running sum
at the end of each sub-block, so every rank learns c at the first token of
every chunk and at the last token of every sub-block (what the ring's skip
table needs) without a second collective.

Backward is the mirror image: dL/dlog f_l = sum_{t >= l} dL/dc_t, a
within-chunk reverse scan plus the sum of the later chunks' totals, which are
all-gathered the same way.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.distributed as dist

from .layout import zigzag_chunks

__all__ = ["global_cumulative_decay"]


def _gather_chunk_values(x: torch.Tensor, group) -> torch.Tensor:
    """x: [..., 2] values of this rank's (lo, hi) chunks -> [..., 2P] in
    global chunk order."""
    P = dist.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(P)]
    dist.all_gather(parts, x.contiguous(), group=group)
    out = x.new_empty(*x.shape[:-1], 2 * P)
    for r, part in enumerate(parts):
        lo, hi = zigzag_chunks(r, P)
        out[..., lo] = part[..., 0]
        out[..., hi] = part[..., 1]
    return out


class _GlobalDecay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, log_f: torch.Tensor, group, out_dtype: torch.dtype, sub_blocks: int, documents=None):
        B, H, T = log_f.shape
        P = dist.get_world_size(group)
        r = dist.get_rank(group)
        Tc = T // 2
        # float64 scan: at 128k tokens float32 sums drift by more than the
        # pruning margins are worth
        x = log_f.detach().to(torch.float64).view(B, H, 2, Tc)
        local = torch.cumsum(x, dim=-1)
        Ts = Tc // sub_blocks
        # per chunk: its first gate, then its running sum at every sub-block end
        ends = torch.cat([x[..., :1], local[..., Ts - 1::Ts]], dim=-1)  # B H 2(chunk) 1+nsub
        ends = _gather_chunk_values(ends.transpose(-1, -2), group)  # B H 1+nsub 2P
        first_gate, sub_ends = ends[..., 0, :], ends[..., 1:, :].transpose(-1, -2)  # B H 2P / B H 2P nsub
        total = sub_ends[..., -1]
        prefix = torch.cumsum(total, dim=-1) - total  # exclusive: sum of earlier chunks
        lo, hi = zigzag_chunks(r, P)
        # stacked slices, not a device index tensor (whose host-to-device
        # copy would stall the host)
        mine = torch.stack([prefix[..., lo], prefix[..., hi]], dim=-1)
        c = (local + mine[..., None]).view(B, H, T)
        # the same float64 expressions as c itself, so the table agrees with
        # the decays the kernel sees bit for bit
        c_first = prefix + first_gate
        c_last = prefix[..., None] + sub_ends
        if documents is not None:
            # packed: each document's decays relative to a base before its
            # start (the same on every rank), in the same float64 expressions
            base = documents.decay_bases(prefix, c_last)  # S H
            c = c - base[documents.local_doc_ids(r, log_f.device)].permute(0, 2, 1)
            # B H 2P: the base of each chunk's first document
            first = base[documents.on_device("first_doc", log_f.device)].permute(0, 2, 1)
            c_last = c_last[..., None, :, :] - first[..., :, None, None]  # B H 2P(query chunk) 2P nsub
            c_first = c_first - first
        c, c_first, c_last = c.to(out_dtype), c_first.to(out_dtype), c_last.to(out_dtype)
        ctx.group = group
        ctx.in_dtype = log_f.dtype
        ctx.mark_non_differentiable(c_first, c_last)
        return c, c_first, c_last

    @staticmethod
    def backward(ctx, dc: torch.Tensor, _df=None, _dl=None):
        group = ctx.group
        P = dist.get_world_size(group)
        r = dist.get_rank(group)
        B, H, T = dc.shape
        g = dc.to(torch.float64).view(B, H, 2, T // 2)
        total = g.sum(-1)  # B H 2
        within = total[..., None] - torch.cumsum(g, dim=-1) + g  # sum_{t >= l} inside the chunk
        totals = _gather_chunk_values(total, group)  # B H 2P
        suffix = torch.flip(torch.cumsum(torch.flip(totals, [-1]), -1), [-1]) - totals  # later chunks
        lo, hi = zigzag_chunks(r, P)
        mine = torch.stack([suffix[..., lo], suffix[..., hi]], dim=-1)
        out = (within + mine[..., None]).view(B, H, T).to(ctx.in_dtype)
        # packed: the document bases get no gradient; theirs is minus the sum
        # of dL/dc over the document, which is zero (every in-document pair
        # adds dS_ij to c_i and takes it from c_j)
        return out, None, None, None, None


def global_cumulative_decay(
    log_fgate_bht: torch.Tensor, group, out_dtype: torch.dtype = torch.float32, sub_blocks: int = 1,
    documents=None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global decays of this rank's tokens and every chunk's boundary decays.

    log_fgate_bht: [B, H, T_local] log forget gates of the local tokens
    (zigzag: chunk r then chunk 2P-1-r, T_local even).  Returns
    (c [B, H, T_local] differentiable, c_first [B, H, 2P],
    c_last [B, H, 2P, sub_blocks]) where c_first is c at the first token of
    every global chunk and c_last at the last token of each of its
    ``sub_blocks`` equal parts (no gradient).

    documents: packed documents (``RingDocuments``): c is then taken
    relative to a per-document base, the decay just before the sub-block
    holding the document's start (differences inside a document, all that
    attention uses, are unchanged; the float32 values stay within one
    sub-block's decay of single-device attention's restarted ones instead of
    growing along the row), c_first relative to the base of each chunk's
    first document, and c_last [B, H, 2P, 2P, sub_blocks] relative to the
    base of the query chunk's (first index) first document: what an
    off-diagonal pair compares.
    """
    if log_fgate_bht.dim() != 3 or log_fgate_bht.shape[-1] % 2:
        raise ValueError(
            f"log forget gates must be [B, H, T_local] with T_local even (two zigzag chunks), "
            f"got {tuple(log_fgate_bht.shape)}"
        )
    if (log_fgate_bht.shape[-1] // 2) % sub_blocks:
        raise ValueError(f"a chunk of {log_fgate_bht.shape[-1] // 2} tokens does not split into {sub_blocks} sub-blocks")
    return _GlobalDecay.apply(log_fgate_bht, group, out_dtype, sub_blocks, documents)
