"""Adaptive Computation Pruning (ACP): threshold, logit bounds, tile boundaries.

Lin et al., "Adaptive Computation Pruning for the Forgetting Transformer"
(COLM 2025).  If every logit satisfies |s * q_i . k_j| <= U, a weight whose
decay D_ij is below

    delta = -2U - log N + log eps

is at most eps / N, so dropping all of them loses at most eps of the
attention mass of any query (N = number of keys the query can see).

Tiles.  D_ij = c_i - c_j grows with j and falls with i (c never increases),
so the largest D of a (query block, key block) tile sits at (first query,
last key).  A tile whose largest D is below delta holds only droppable
pairs and is skipped; the kernels compute the tiles they keep whole (the
torch reference drops every pair below delta: naive.py).  For a query
block the kept key blocks are one contiguous range [kstart_m, diagonal]
with kstart_m non-decreasing in m: every boundary follows from the M + N
block-edge decays alone (a two-pointer walk, or, as the Triton kernel does
it, a bisection per row run for all rows at once).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

__all__ = [
    "AcpConfig",
    "acp_threshold",
    "logit_bound_from_qk_norm",
    "logit_bound_from_tensors",
    "reference_block_boundaries",
    "kept_tile_fraction",
]

DEFAULT_LOG_EPS = -10.0


@dataclass(frozen=True)
class AcpConfig:
    """ACP settings for ``forgetting_attention``.

    log_eps:     log of the attention mass a query may lose (default -10,
                 i.e. eps = e^-10).
    logit_bound: U with |softmax_scale * q . k| <= U.  A float, a tensor of
                 shape [Hq] or [S, Hq], or None to compute it from q and k
                 (max ||q|| * max ||k|| * scale per sequence and head).  Use
                 ``logit_bound_from_qk_norm`` when q and k are RMS-normalised.
    min_seqlen:  prune only in calls whose longest sequence (document, when
                 packed) has at least this many tokens; shorter calls run
                 without pruning (exact attention, kept fraction 1).  Short
                 documents leave little to prune, and the tiles next to the
                 pruned ones cost more than plain ones: with 512-token
                 documents ACP kept 92% of the tiles and made the attention
                 step up to 12% slower on an H200, with 1024-token documents
                 it was 1-8% faster (paper-like gates; README).  Decided on
                 the host from the known lengths: no device sync.
    """

    log_eps: float = DEFAULT_LOG_EPS
    logit_bound: Optional[Union[float, torch.Tensor]] = None
    min_seqlen: int = 0

    def __post_init__(self):
        if not (self.log_eps < 0.0):
            raise ValueError(f"AcpConfig.log_eps must be negative (eps < 1), got {self.log_eps}")
        if isinstance(self.min_seqlen, bool) or not isinstance(self.min_seqlen, int) or self.min_seqlen < 0:
            raise ValueError(f"AcpConfig.min_seqlen must be an int >= 0, got {self.min_seqlen!r}")
        if isinstance(self.logit_bound, (int, float)) and not self.logit_bound >= 0:
            raise ValueError(f"AcpConfig.logit_bound must be >= 0, got {self.logit_bound}")


def logit_bound_from_qk_norm(
    q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor, softmax_scale: float
) -> torch.Tensor:
    """U for RMS-normalised q and k: s * d * max|w_q| * max|w_k|.

    After RMSNorm every entry of q is w_q[d] * x_d with sum_d x_d^2 = d, so
    ||q|| <= sqrt(d) max|w_q|; the same for k.  Weights of shape [D] give a
    scalar tensor, weights of shape [H, D] (per-head norms) give [H].  No pass
    over the activations is needed.
    """
    d = q_norm_weight.shape[-1]
    wq = q_norm_weight.detach().abs().amax(dim=-1).float()
    wk = k_norm_weight.detach().abs().amax(dim=-1).float()
    return softmax_scale * d * wq * wk


def logit_bound_from_tensors(
    q: torch.Tensor,
    k: torch.Tensor,
    softmax_scale: float,
    seq_index: Optional[torch.Tensor] = None,
    num_seqs: Optional[int] = None,
) -> torch.Tensor:
    """U per sequence and query head from the data: s * max||q|| * max||k||.

    q: [B, T, Hq, D], k: [B, T, Hkv, D] (bshd views).  seq_index: optional
    [B, T] sequence (document) id of every token; then the maxima are taken
    per document.  Returns [S, Hq] float32 (S = B, or num_seqs).
    """
    B, T, Hq, _ = q.shape
    Hkv = k.shape[2]
    qn = q.detach().float().norm(dim=-1)  # B T Hq
    kn = k.detach().float().norm(dim=-1)  # B T Hkv
    if seq_index is None:
        qmax = qn.amax(dim=1)
        kmax = kn.amax(dim=1)
    else:
        idx = seq_index.reshape(-1, 1)
        qmax = torch.zeros(num_seqs, Hq, device=q.device).scatter_reduce_(
            0, idx.expand(-1, Hq), qn.reshape(-1, Hq), "amax", include_self=True)
        kmax = torch.zeros(num_seqs, Hkv, device=q.device).scatter_reduce_(
            0, idx.expand(-1, Hkv), kn.reshape(-1, Hkv), "amax", include_self=True)
    kmax = kmax.repeat_interleave(Hq // Hkv, dim=1)
    return softmax_scale * qmax * kmax


def acp_threshold(
    logit_bound: Union[float, torch.Tensor], num_keys: Union[int, torch.Tensor], log_eps: float = DEFAULT_LOG_EPS
) -> torch.Tensor:
    """delta = -2U - log N + log eps (elementwise; broadcasts U against N).

    num_keys: the most keys any query can see (the sequence or document
    length); a tensor [S, 1] gives a per-sequence N.
    """
    U = torch.as_tensor(logit_bound, dtype=torch.float32)
    if isinstance(num_keys, int):
        # a Python count stays on the host (a device scalar would cost a sync)
        return -2.0 * U - math.log(max(num_keys, 1)) + float(log_eps)
    N = torch.as_tensor(num_keys, dtype=torch.float32, device=U.device).clamp_min(1.0)
    return -2.0 * U - torch.log(N) + float(log_eps)


def reference_block_boundaries(
    c: torch.Tensor, threshold: torch.Tensor, block_m: int, block_n: int, causal: bool = True
) -> torch.Tensor:
    """First kept key block of every query block (torch, O(M * N) per head).

    c: [S, H, T] cumulative decay of one sequence per row (queries and keys
    are the same tokens when causal).  threshold: [S, H].  Returns int32
    [S, H, M].  Used as the test oracle for the Triton boundary search and as
    the statistics path on CPU.
    """
    S, H, T = c.shape
    M = -(-T // block_m)
    N = -(-T // block_n)
    q_first = c[:, :, torch.arange(M, device=c.device) * block_m]  # S H M
    k_last = c[:, :, torch.clamp((torch.arange(N, device=c.device) + 1) * block_n, max=T) - 1]  # S H N
    pruned = (q_first[..., :, None] - k_last[..., None, :]) < threshold[..., None, None]
    if causal:
        # key blocks past the diagonal are not part of the causal range
        diag = ((torch.arange(M, device=c.device) + 1) * block_m - 1).clamp(max=T - 1) // block_n
        beyond = torch.arange(N, device=c.device)[None, :] > diag[:, None]
        pruned = pruned & ~beyond
    # pruned blocks form a prefix: count them
    return pruned.sum(dim=-1).to(torch.int32)


def kept_tile_fraction(
    kstart: torch.Tensor, seq_lens: torch.Tensor, block_m: int, block_n: int
) -> torch.Tensor:
    """Per-head fraction of causal tiles that ACP keeps.

    kstart: [S, H, M] first kept key block per query block; seq_lens: [S].
    Returns float32 [H]: kept tiles / causal tiles, summed over sequences.
    """
    S, H, M = kstart.shape
    m = torch.arange(M, device=kstart.device)
    lens = seq_lens.to(kstart.device).long()
    valid = (m[None, :] * block_m) < lens[:, None]  # S M
    diag = torch.minimum((m[None, :] + 1) * block_m, lens[:, None]) - 1
    diag = diag.clamp_min(0) // block_n  # S M
    total = ((diag + 1) * valid).sum()
    kept = ((diag[:, None, :] + 1 - kstart.long()).clamp_min(0) * valid[:, None, :]).sum(dim=(0, 2))
    return kept.float() / total.clamp_min(1).float()
