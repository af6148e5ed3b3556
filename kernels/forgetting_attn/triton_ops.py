"""Triton kernels for forgetting attention with Adaptive Computation Pruning.

FlashAttention-2 style tiling (Dao, 2023): the forward keeps a running max
and sum per query row; the backward recomputes probabilities from the saved
log-sum-exp, with one kernel for dQ (a program per query block, looping
over key blocks; it also finds each row's delta = do . o, which saves a
separate pass over o and do) and one for dK/dV after it (a program per key
block, looping over query blocks).  The decay enters every logit as
c_i - c_j (log2 units inside the kernels); its gradient is the row sum of
dS minus the column sum of dS.
Measured on an H200 and not kept: a one-pass backward that adds each
tile's dQ in float32 (by atomic adds as in FlashAttention-2, or by TMA
reductions as in FlashAttention-3) was slower and no more accurate
(benchmarks/results/attention_onepass_bwd_h200.json); tiles loaded through
TMA descriptors instead of pointers gained 1-3% in the forward and nothing
in the backward (attention_tma_loads_h200.json).

ACP (Lin et al., COLM 2025): a tile whose largest decay c[first q] - c[last k]
is below the threshold holds only pruned pairs and is never visited.  The
kept tiles of a query block form one range [kstart, diagonal]; the boundary
kernel finds kstart for every query block, and the mirror end of the kept
query range for every key block, from the M + N block-edge decays alone (no
pass over the L x L matrix): each boundary is the length of a monotone
prefix, so every row and column bisects for it at once, log2(N) dependent
steps deep (a serial two-pointer walk does O(M + N) loads, but each waits for
the last, and that latency cost 3% of a 16k step).  Kept tiles are computed
whole, as in the ACP paper's kernels: every pair left out has D_ij < delta,
so at most eps of a query's attention mass is lost, but which of those pairs
are left out depends on the tile shape (the forward and the two backward
passes may differ there).  The torch reference leaves out every pair below
delta, the most the bound allows; the kernels agree with it to within that
mass.  Earlier versions masked the pruned pairs of kept tiles element by
element; computing those tiles whole made the ACP step 0.6-2.5% faster on an
H200 (8k and 16k, both head dims, 2 alternating rounds) with the same
output and gradients but for dq's summation order
(benchmarks/results/attention_tile_rule_ab_h200.json).

Each kernel visits two ranges of tiles: the tiles below the diagonal (no
mask at all: the fast path) and the diagonal / ragged-edge tiles (causal and
bounds masks), with or without ACP.

Sequences are described by a table of (row, start, length) for queries and
keys, so packed documents, plain batches and context-parallel chunk pairs
share one code path; tensors are addressed through their strides, so
[batch, seq, ...] and [seq, batch, ...] layouts need no copy.
"""

from __future__ import annotations

import functools
import warnings

import torch
import triton
import triton.language as tl
from triton.compiler.errors import CompilationError

from . import gluon_bwd, gluon_fwd
from .tile_ranges import first_query_blocks, key_tiles, query_tiles, sequence_and_head


LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Tile shapes and launch settings per kernel and head dim (<= 64, 128):
# (BLOCK_M, BLOCK_N, num_warps, num_stages).  The dQ kernel reuses the
# forward's boundaries when their tiles agree.  ACP statistics are counted in
# the forward's tiles.
# Chosen by benchmarks/tune_attention.py on an H100 (L = 16384, paper-like
# gates; benchmarks/results/tune_attention_h100.json).
CONFIGS = {
    "fwd": {64: (128, 64, 4, 3), 128: (128, 64, 8, 3)},
    "dkdv": {64: (32, 128, 4, 3), 128: (32, 64, 4, 3)},
    "dq": {64: (128, 64, 4, 3), 128: (128, 128, 8, 2)},
}


# fp32 inputs (tests, reference checks) take small unpipelined tiles: their
# tiles are twice the bytes of bf16 ones, and the bf16 shapes at head dim 128
# exceed the H100's 227 KiB of shared memory.
FP32_CONFIGS = {"fwd": (64, 32, 4, 1), "dkdv": (32, 64, 4, 1), "dq": (64, 32, 4, 1)}


def config_key(head_dim: int) -> int:
    """The CONFIGS row a head dim uses (<= 64, or 128)."""
    return 64 if head_dim <= 64 else 128


def kernel_config(kind: str, head_dim: int, dtype: torch.dtype = torch.bfloat16):
    if dtype == torch.float32:
        return FP32_CONFIGS[kind]
    return CONFIGS[kind][config_key(head_dim)]


# ACP's boundaries and statistics are found in the Triton forward's tiles;
# the Gluon forward's query blocks divide them and its key tiles are whole
# numbers of them
assert all(CONFIGS["fwd"][d][0] % bm == 0 and bn % CONFIGS["fwd"][d][1] == 0
           for d, (bm, bn, _, _) in gluon_fwd.CONFIGS.items())

# True: single-GPU bf16 forwards on Hopper at head dims 64 and 128 run the
# warp-specialised Gluon kernel (gluon_fwd.py) instead of _fwd_kernel below:
# on an H200 its first version made the fwd + bwd step 0.8-3.0% faster at
# head dim 128 (benchmarks/results/attention_gluon_fwd_128_h200.json); the
# ping-pong and the decays' prefetch since made it faster again, and at head
# dim 64 it now takes 0.1-1.5% off the step (gluon_fwd's docstring).
USE_GLUON_FWD = True
# True: single-GPU bf16 backwards on Hopper run the warp-specialised Gluon
# dK / dV kernel (gluon_bwd.py) instead of _dkdv_kernel below where
# gluon_bwd.DISPATCH says so (head dims 64 and 128): on an H200 its first
# version made the fwd + bwd step 5.6-8.5% faster at head dim 128
# (benchmarks/results/attention_gluon_dkdv_h200.json); at head dim 64 the
# current one takes 7-10% off it (gluon_bwd's docstring).
USE_GLUON_DKDV = True
# True (with USE_GLUON_DKDV): where gluon_bwd.DISPATCH says "fused" (head dim
# 128), that kernel also computes dQ and dc_q, from dS kept in
# shared memory, and adds them to float32 buffers (by TMA reduce-adds that a
# write warp issues, as FlashAttention-3 does), so the dQ kernel, which
# recomputes S and dP, does not run.  The adds' order varies, so dq is not
# bitwise reproducible: the dQ kernel runs whenever
# torch.use_deterministic_algorithms is on.
USE_GLUON_FUSED_DQ = True


# True: under ACP the kernels launch the (sequence, head) pairs with the
# most kept tiles first (heavy_first), instead of in the heads' order.
# Pruning leaves the heads very different amounts of work, and the GPU
# starts programs in grid order, so heads that happen to come last with
# long programs leave a long last wave (tile_ranges.sequence_and_head).
ORDER_BY_KEPT_TILES = True


def fwd_blocks(head_dim: int, dtype: torch.dtype = torch.bfloat16):
    """(BLOCK_M, BLOCK_N) in which the forward skips tiles (and stats count)."""
    return kernel_config("fwd", head_dim, dtype)[:2]


# --------------------------------------------------------------------------
# precise decays
# --------------------------------------------------------------------------
# c grows along a document (by its length times the fastest forgetting rate)
# and a float32 holds it only to |c| * 2^-24: at |c| ~ 1e5 that is 0.006 in
# every decay c_i - c_j, a 0.6% error in the weights of neighbouring tokens.
# By default c is float32, as in FLA's kernels: the fastest path.  Precise
# decays (``precise_decay``) scan c in float64.  The float64 work on every
# tile's key decays costs time (on an H200, 4-15% of a fwd + bwd step at
# 8k-16k; two float32 planes hi + lo in its place cost 5-23%), hence opt-in.
#
# Either way the kernels take c relative to a reference token near the tile
# (a query: keys hidden from a context-parallel call carry c = 1e30), in c's
# precision, and round only that difference to float32: a vector op per
# tile.  The key's part of the decay then goes into the FMA of the scores,
# t = s - (c_i - ref) = scale * q.k - (c_j - ref), with no float32 rounding
# at the size of |c|; the row's own c_i - ref is a constant of the softmax
# row and enters only its log-sum-exp.  Against c_i - c_j per element this
# saves an op per score (with the one-compare masks below and delta from
# the dQ kernel, a fwd + bwd step on an H200 at 8k-16k was 0.8-2.0% faster
# without ACP, and with it from 0.2% slower to 4.0% faster:
# benchmarks/results/attention_decay_fold_h200.json).

@triton.jit
def _decay_ref(ptr, idx):
    """c at idx, the reference of _decay_rel."""
    return tl.load(ptr + idx)


@triton.jit
def _decay_rel(ptr, offs, mask, ref, MASKED: tl.constexpr):
    """c[offs] - ref in c's precision, rounded to float32 (0 - ref where
    masked)."""
    if MASKED:
        d = tl.load(ptr + offs, mask=mask, other=0.0)
    else:
        d = tl.load(ptr + offs)
    return (d - ref).to(tl.float32)


def _run_gluon(switch, launch, *args):
    """Launch a Gluon kernel; False if this Triton cannot compile it (Gluon's
    API moves between releases): then the switch is turned off with a
    warning and the caller runs its Triton kernel (nothing was written)."""
    try:
        launch(*args)
    except CompilationError as e:
        globals()[switch] = False
        warnings.warn(f"{launch.__module__}.{launch.__name__} does not compile with Triton {triton.__version__}; "
                      f"the Triton kernel runs instead ({switch} turned off): {str(e)[-500:]}", RuntimeWarning,
                      stacklevel=3)
        return False
    return True


# --------------------------------------------------------------------------
# ACP boundary search
# --------------------------------------------------------------------------


@triton.jit
def _acp_boundary_kernel(
    CQ, CK, stride_cqb, stride_cqh, stride_ckb, stride_ckh,
    ROW, QROW, QSTART, QLEN, KSTART_POS, KLEN,
    THR, stride_thr_s,
    KBLO, stride_kb_s, stride_kb_h,
    QBHI, stride_qb_s, stride_qb_h,
    TILES, stride_tl_s, stride_tl_h,
    SEARCH_STEPS_N, SEARCH_STEPS_M,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LANES: tl.constexpr,
    CAUSAL: tl.constexpr, DO_KBLO: tl.constexpr, DO_QBHI: tl.constexpr, DO_COUNT: tl.constexpr,
    QB_BLOCK_M: tl.constexpr, QB_BLOCK_N: tl.constexpr,
):
    # KBLO in BLOCK_M x BLOCK_N tiles, QBHI in QB_BLOCK_M x QB_BLOCK_N ones
    # (the forward's and the dK / dV kernel's: one launch serves both)
    # Both answers are counts of a monotone predicate (pruned key blocks are
    # a prefix of every query block's row, kept query blocks a prefix of
    # every key block's column), so each lane bisects its own row or column:
    # LANES boundaries at once in log2 dependent steps, where a serial
    # two-pointer walk takes M + N dependent loads.
    s = tl.program_id(0)
    h = tl.program_id(1)
    row = tl.load(ROW + s).to(tl.int64)
    qrow = tl.load(QROW + s).to(tl.int64)
    qlen = tl.load(QLEN + s)
    klen = tl.load(KLEN + s)
    cq_ptr = CQ + qrow * stride_cqb + h * stride_cqh + tl.load(QSTART + s)
    ck_ptr = CK + row * stride_ckb + h * stride_ckh + tl.load(KSTART_POS + s)
    thr = tl.load(THR + s * stride_thr_s + h)
    num_m = tl.cdiv(qlen, BLOCK_M)
    num_n = tl.cdiv(klen, BLOCK_N)
    lanes = tl.arange(0, LANES)
    if DO_KBLO:
        # first kept key block of every query block: the number of key
        # blocks whose largest decay (first query, last key) is below thr,
        # capped at the diagonal; and (DO_COUNT) the kept and the causal tiles
        # (names differ from the second search's: a name reused with another
        # type would be a loop-carried variable to the Triton compiler)
        kept_tiles = tl.zeros([], dtype=tl.int32)
        all_tiles = tl.zeros([], dtype=tl.int32)
        for m0 in range(0, num_m, LANES):
            m = m0 + lanes
            live = m < num_m
            m_in = tl.minimum(m, num_m - 1)
            c_first_q = tl.load(cq_ptr + m_in * BLOCK_M)
            # lo: the pruned key blocks (largest decay, first query - last
            # key, below thr)
            lo = tl.zeros([LANES], dtype=tl.int32)
            hi = tl.zeros([LANES], dtype=tl.int32) + num_n
            for _ in range(SEARCH_STEPS_N):
                mid = (lo + hi) // 2
                c_last_k = tl.load(ck_ptr + tl.minimum((mid + 1) * BLOCK_N, klen) - 1)
                pruned = (mid < hi) & (c_first_q - c_last_k < thr)
                lo = tl.where(pruned, mid + 1, lo)
                hi = tl.where(pruned | (mid >= hi), hi, mid)
            if CAUSAL:
                n_end = (tl.minimum((m + 1) * BLOCK_M, qlen) - 1) // BLOCK_N + 1
            else:
                n_end = tl.zeros([LANES], dtype=tl.int32) + num_n
            lo = tl.minimum(lo, n_end)
            tl.store(KBLO + s * stride_kb_s + h * stride_kb_h + m, lo, mask=live)
            if DO_COUNT:
                kept_tiles += tl.sum(tl.where(live, n_end - lo, 0), 0)
                all_tiles += tl.sum(tl.where(live, n_end, 0), 0)
        if DO_COUNT:
            tl.store(TILES + s * stride_tl_s + h * stride_tl_h, kept_tiles)
            tl.store(TILES + s * stride_tl_s + h * stride_tl_h + 1, all_tiles)
    if DO_QBHI:
        # end (exclusive) of the kept query blocks of every key block: the
        # number of query blocks whose largest decay against it is at or
        # above thr, at least the diagonal block
        num_m2 = tl.cdiv(qlen, QB_BLOCK_M)
        num_n2 = tl.cdiv(klen, QB_BLOCK_N)
        for n0 in range(0, num_n2, LANES):
            n = n0 + lanes
            live_n = n < num_n2
            n_in = tl.minimum(n, num_n2 - 1)
            c_last_k2 = tl.load(ck_ptr + tl.minimum((n_in + 1) * QB_BLOCK_N, klen) - 1)
            lo2 = tl.zeros([LANES], dtype=tl.int32)
            hi2 = tl.zeros([LANES], dtype=tl.int32) + num_m2
            for _ in range(SEARCH_STEPS_M):
                mid2 = (lo2 + hi2) // 2
                c_first_q2 = tl.load(cq_ptr + tl.minimum(mid2 * QB_BLOCK_M, qlen - 1))
                kept_q = (mid2 < hi2) & (c_first_q2 - c_last_k2 >= thr)
                lo2 = tl.where(kept_q, mid2 + 1, lo2)
                hi2 = tl.where(kept_q | (mid2 >= hi2), hi2, mid2)
            if CAUSAL:
                lo2 = tl.maximum(lo2, (n * QB_BLOCK_N) // QB_BLOCK_M)
            tl.store(QBHI + s * stride_qb_s + h * stride_qb_h + n, lo2, mask=live_n)


_BOUNDARY_LANES = 128


def _boundary_table(kind, shape, device):
    # every entry a kernel reads is written (blocks past a sequence's end
    # are neither written nor read): no fill needed.  A test fills them
    # with "prune everything" to catch a read of an unwritten entry.
    return torch.empty(shape, dtype=torch.int32, device=device)


@functools.lru_cache(maxsize=16)
def _dummy_table(device):
    # stands in for the outputs a launch does not ask for (never written)
    return torch.zeros(1, 1, 1, dtype=torch.int32, device=device)


def block_boundaries(c_q, c_k, seq, thr, block_m, block_n, causal, want_kblo=True, want_qbhi=False, tiles=None,
                     qbhi_blocks=None):
    """Run the boundary kernel.  c_q/c_k: [B, H, T] float32 or float64
    (precise decays: compared in float64).  Returns
    (kblo [S, H, M] int32 or None, qbhi [S, H, N] int32 or None; M and N
    count blocks of the table's own tile shape).
    kblo[..., m]: the first kept key block of query block m (capped at the
    diagonal); qbhi[..., n]: the end of the kept query blocks of key block n
    (at least the diagonal).
    ``tiles``: optional int32 [S, H, 2] (with want_kblo) that receives the
    kept and the total (causal) tiles of every (sequence, head): ACP's
    statistics without a pass over the boundaries on the host side.
    ``qbhi_blocks``: (block_m, block_n) of qbhi when they differ from
    kblo's (both from one launch)."""
    S, H = thr.shape
    M = max(triton.cdiv(seq.max_qlen, block_m), 1)
    N = max(triton.cdiv(seq.max_klen, block_n), 1)
    qb_m, qb_n = qbhi_blocks or (block_m, block_n)
    M2 = max(triton.cdiv(seq.max_qlen, qb_m), 1)
    N2 = max(triton.cdiv(seq.max_klen, qb_n), 1)
    dev = c_q.device
    kblo = _boundary_table("kblo", (S, H, M), dev) if want_kblo else None
    qbhi = _boundary_table("qbhi", (S, H, N2), dev) if want_qbhi else None
    dummy = _dummy_table(dev)
    kb, qb = (kblo if kblo is not None else dummy), (qbhi if qbhi is not None else dummy)
    count = tiles is not None and want_kblo
    tl_ = tiles if count else dummy
    _acp_boundary_kernel[(S, H)](
        c_q, c_k, c_q.stride(0), c_q.stride(1), c_k.stride(0), c_k.stride(1),
        seq.row, seq.qrow, seq.qstart, seq.qlen, seq.kstart, seq.klen,
        thr, thr.stride(0),
        kb, kb.stride(0), kb.stride(1),
        qb, qb.stride(0), qb.stride(1),
        tl_, tl_.stride(0), tl_.stride(1),
        # bisection over [0, N] takes bit_length(N) halvings
        int(N).bit_length(), int(M2).bit_length(),
        BLOCK_M=block_m, BLOCK_N=block_n, LANES=_BOUNDARY_LANES, CAUSAL=causal,
        DO_KBLO=want_kblo, DO_QBHI=want_qbhi, DO_COUNT=count, QB_BLOCK_M=qb_m, QB_BLOCK_N=qb_n,
    )
    return kblo, qbhi


# the most (sequence, head) pairs heavy_first ranks in one program (a
# compare of every pair with every other); more are sorted by torch
_ORDER_MAX_PAIRS = 4096


@triton.jit
def _pair_kept_tiles(TILES, stride_ts, stride_th, idx, num_seqs, num_pairs, GROUP: tl.constexpr):
    """Kept tiles of pairs idx = s + S * h (S = num_seqs), h a head of GROUP
    query heads: a key / value head when GROUP > 1 (0 past the last pair)."""
    w = tl.zeros(idx.shape, dtype=tl.int32)
    for g in tl.static_range(GROUP):
        head = (idx // num_seqs) * GROUP + g
        w += tl.load(TILES + (idx % num_seqs) * stride_ts + head * stride_th, mask=idx < num_pairs, other=0)
    return w


@triton.jit
def _heavy_first_kernel(TILES, stride_ts, stride_th, ORDER, num_seqs, num_pairs, GROUP: tl.constexpr,
                        BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    # one program: pair i's rank is the number of pairs with more kept
    # tiles, or as many and a lower index, and ORDER[rank] = i
    i = tl.arange(0, BLOCK)
    w_i = _pair_kept_tiles(TILES, stride_ts, stride_th, i, num_seqs, num_pairs, GROUP)
    rank = tl.zeros([BLOCK], dtype=tl.int32)
    for j0 in range(0, num_pairs, CHUNK):
        j = j0 + tl.arange(0, CHUNK)
        w_j = _pair_kept_tiles(TILES, stride_ts, stride_th, j, num_seqs, num_pairs, GROUP)
        before = (w_j[None, :] > w_i[:, None]) | ((w_j[None, :] == w_i[:, None]) & (j[None, :] < i[:, None]))
        rank += tl.sum((before & (j[None, :] < num_pairs)).to(tl.int32), 1)
    tl.store(ORDER + rank, i, mask=i < num_pairs)


def heavy_first(tiles: torch.Tensor, group: int = 1):
    """Launch order of the (sequence, head) pairs, from the boundary
    kernel's counts: tiles int32 [S, Hq, 2] (kept tiles first); group > 1
    orders (sequence, key / value head) pairs by their query heads' sum.
    Returns int32 [S * H] of s + S * h, most kept tiles first (ties in the
    grid's own order, heads outermost).  Up to _ORDER_MAX_PAIRS pairs one
    launch and no sort (its cost is a launch's); above, a torch sort."""
    S, Hq = tiles.shape[:2]
    n = S * (Hq // group)
    if n > _ORDER_MAX_PAIRS:
        kept = tiles[..., 0].view(S, Hq // group, group).sum(-1)
        return torch.argsort(kept.t().reshape(-1), descending=True, stable=True).to(torch.int32)
    order = torch.empty(n, dtype=torch.int32, device=tiles.device)
    block = max(triton.next_power_of_2(n), 16)
    chunk = max(16, min(64, 8192 // block))
    _heavy_first_kernel[(1,)](tiles, tiles.stride(0), tiles.stride(1), order, S, n, GROUP=group, BLOCK=block,
                              CHUNK=chunk, num_warps=4)
    return order


# --------------------------------------------------------------------------
# cumulative decay and its gradient: one segmented scan per (sequence, head)
# --------------------------------------------------------------------------


@triton.jit
def _segmented_scan_kernel(
    X, Y, OUT, ROW, START, LEN,
    stride_xb, stride_xt, stride_xh, stride_ob, stride_oh,
    HAS_Y: tl.constexpr, REVERSE: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # Prefix sums (REVERSE: suffix sums) of x (+ y, same strides) along time
    # within one sequence: blocks in scan order, a running carry between
    # them, in OUT's dtype.  Forward, c from log f: float32, or float64 for
    # precise decays (see above).  Backward, the gradient of c from
    # dc_q + dc_k: the same scan reversed, in float32.
    s = tl.program_id(0)
    h = tl.program_id(1)
    row = tl.load(ROW + s).to(tl.int64)
    start = tl.load(START + s).to(tl.int64)
    length = tl.load(LEN + s)
    x_off = row * stride_xb + h * stride_xh + start * stride_xt
    o_base = OUT + row * stride_ob + h * stride_oh + start
    acc_ty = OUT.dtype.element_ty
    carry = tl.zeros([], dtype=acc_ty)
    num_blocks = tl.cdiv(length, BLOCK_T)
    for i in range(0, num_blocks):
        blk = num_blocks - 1 - i if REVERSE else i
        offs = blk * BLOCK_T + tl.arange(0, BLOCK_T)
        mask = offs < length
        x = tl.load(X + x_off + offs * stride_xt, mask=mask, other=0.0).to(acc_ty)
        if HAS_Y:
            x += tl.load(Y + x_off + offs * stride_xt, mask=mask, other=0.0).to(acc_ty)
        tl.store(o_base + offs, tl.cumsum(x, 0, reverse=REVERSE) + carry, mask=mask)
        carry += tl.sum(x, 0)


_SCAN_BLOCK = 1024


def _segmented_scan(x, y, seqs, reverse, dtype=torch.float32):
    """[B, H, T] scans (accumulated in ``dtype``) of x ([B, T, H] view, any
    strides) plus y (same strides, or None) within every sequence of
    ``seqs``."""
    B, T, H = x.shape
    out = torch.empty(B, H, T, dtype=dtype, device=x.device)
    if y is not None and y.stride() != x.stride():
        raise ValueError("the two scanned tensors must share their strides")
    if seqs.num:
        _segmented_scan_kernel[(seqs.num, H)](
            x, y if y is not None else x, out, seqs.row, seqs.start, seqs.length,
            x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1),
            HAS_Y=y is not None, REVERSE=reverse, BLOCK_T=_SCAN_BLOCK,
        )
    return out


def cumulative_decay(log_fgate, seqs, precise=False):
    """c [B, H, T] (time innermost, where the attention kernels read it)
    from log forget gates [B, T, H] (any strides), restarting at every
    sequence of ``seqs`` (an ``interface.SequenceTable``): float32, or
    float64 with ``precise``."""
    return _segmented_scan(log_fgate, None, seqs, reverse=False,
                           dtype=torch.float64 if precise else torch.float32)


def decay_precision(c_q, c_k):
    """Both decays in float64 if either is (precise decays), else float32."""
    if torch.float64 in (c_q.dtype, c_k.dtype):
        return c_q.double(), c_k.double()
    return c_q.float(), c_k.float()


def cumulative_decay_grad(dc_q, dc_k, seqs):
    """Gradient of ``cumulative_decay`` for dL/dc = dc_q + dc_k ([B, H, T]
    fp32): the suffix sums within every sequence, as [B, T, H] (a view)."""
    t = lambda x: x.permute(0, 2, 1)  # noqa: E731  [B, T, H] views
    return _segmented_scan(t(dc_q), t(dc_k), seqs, reverse=True).permute(0, 2, 1)


# --------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------


@triton.jit
def _last_keys(offs_m, klen, CAUSAL: tl.constexpr):
    """The last key each query row may see [BLOCK_M]: the causal and the
    length mask as one bound."""
    if CAUSAL:
        last = tl.minimum(offs_m, klen - 1)
    else:
        last = tl.zeros_like(offs_m) + (klen - 1)
    return last


@triton.jit
def _fwd_tiles(
    acc, l_i, m_i, q, c_ref, k_base, v_base, ck_base, stride_kt, stride_vt,
    kb_lo, kb_hi, klen, k_last, offs_n, offs_d,
    BLOCK_N: tl.constexpr, MASK_POS: tl.constexpr, scale2, PRECISION: tl.constexpr,
):
    # Scores are kept without the row's decay (t, see "precise decays"
    # above), so m_i is a maximum of t.  MASK_POS: keys up to each row's
    # k_last (_last_keys: the causal and length masks in one compare); it
    # also masks the loads at klen.
    for kb in range(kb_lo, kb_hi):
        offs_k = kb * BLOCK_N + offs_n
        if MASK_POS:
            kmask = offs_k < klen
            k = tl.load(k_base + offs_k[None, :] * stride_kt + offs_d[:, None], mask=kmask[None, :], other=0.0)
            v = tl.load(v_base + offs_k[:, None] * stride_vt + offs_d[None, :], mask=kmask[:, None], other=0.0)
            ck2 = _decay_rel(ck_base, offs_k, kmask, c_ref, True) * 1.4426950408889634
        else:
            k = tl.load(k_base + offs_k[None, :] * stride_kt + offs_d[:, None])
            v = tl.load(v_base + offs_k[:, None] * stride_vt + offs_d[None, :])
            ck2 = _decay_rel(ck_base, offs_k, offs_k, c_ref, False) * 1.4426950408889634
        t = tl.dot(q, k, input_precision=PRECISION) * scale2 - ck2[None, :]
        if MASK_POS:
            t = tl.where(offs_k[None, :] <= k_last[:, None], t, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(t, 1))
            # a row with nothing kept yet keeps m = -inf; shift by 0 instead
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(t, 1))
            m_shift = m_new
        p = tl.math.exp2(t - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V, CQ, CK, O, LSE, KBLO, ORDER,
    ROW, QROW, QSTART, QLEN, KSTART_POS, KLEN,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_cqb, stride_cqh, stride_ckb, stride_ckh,
    stride_lb, stride_lh,
    stride_kblo_s, stride_kblo_h,
    scale2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, USE_ACP: tl.constexpr, PRECISION: tl.constexpr, ACCUMULATE: tl.constexpr,
    ORDERED: tl.constexpr,
):
    # ROW indexes the batch of K, V and CK; QROW that of Q, CQ, O and LSE
    # (the same table for plain attention; a context-parallel pair reads
    # selected query rows of whole tensors in place).  ACCUMULATE: O (fp32)
    # and LSE already hold a partial result over other keys, which this one
    # is merged into by the log-sum-exp rule.
    s_id, h = sequence_and_head(ORDER, ORDERED)
    qlen = tl.load(QLEN + s_id)
    # causal: the last query blocks have the most tiles; launch them first
    pid_m = tl.cdiv(qlen, BLOCK_M) - 1 - tl.program_id(0) if CAUSAL else tl.program_id(0)
    # the grid covers the longest sequence: blocks past this one's end
    if (pid_m < 0) | (pid_m * BLOCK_M >= qlen):
        return
    klen = tl.load(KLEN + s_id)
    row = tl.load(ROW + s_id).to(tl.int64)
    qrow = tl.load(QROW + s_id).to(tl.int64)
    q0 = tl.load(QSTART + s_id).to(tl.int64)
    k0 = tl.load(KSTART_POS + s_id).to(tl.int64)
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    qmask = offs_m < qlen
    q = tl.load(Q + qrow * stride_qb + h * stride_qh + (q0 + offs_m)[:, None] * stride_qt + offs_d[None, :],
                mask=qmask[:, None], other=0.0)
    cq_base = CQ + qrow * stride_cqb + h * stride_cqh + q0
    # decays relative to the block's first query (see above)
    c_ref = _decay_ref(cq_base, pid_m * BLOCK_M)
    cq2 = _decay_rel(cq_base, offs_m, qmask, c_ref, True) * 1.4426950408889634
    k_base = K + row * stride_kb + hk * stride_kh + k0 * stride_kt
    v_base = V + row * stride_vb + hk * stride_vh + k0 * stride_vt
    ck_base = CK + row * stride_ckb + h * stride_ckh + k0

    lo, mid, hi = key_tiles(KBLO, s_id, h, pid_m, qlen, klen, stride_kblo_s, stride_kblo_h, BLOCK_M, BLOCK_N,
                            BLOCK_M, BLOCK_N, CAUSAL, USE_ACP)
    k_last = _last_keys(offs_m, klen, CAUSAL)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # the unmasked tiles, then the diagonal / ragged-edge ones
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, c_ref, k_base, v_base, ck_base, stride_kt, stride_vt,
                               lo, mid, klen, k_last, offs_n, offs_d, BLOCK_N, False, scale2, PRECISION)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, c_ref, k_base, v_base, ck_base, stride_kt, stride_vt,
                               mid, hi, klen, k_last, offs_n, offs_d, BLOCK_N, True, scale2, PRECISION)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    # m_i is a maximum of s - c_i: the row's decay comes back here
    lse = tl.where(empty, float("-inf"), ((m_i + cq2) + tl.math.log2(l_safe)) * 0.6931471805599453)
    o_ptrs = O + qrow * stride_ob + h * stride_oh + (q0 + offs_m)[:, None] * stride_ot + offs_d[None, :]
    lse_ptrs = LSE + qrow * stride_lb + h * stride_lh + q0 + offs_m
    if ACCUMULATE:
        # o = (w_old o_old + w_new o_new) / (w_old + w_new), w = exp(lse - max);
        # rows with no kept key on either side stay (0, -inf)
        lse_old = tl.load(lse_ptrs, mask=qmask, other=float("-inf"))
        o_old = tl.load(o_ptrs, mask=qmask[:, None], other=0.0)
        top = tl.maximum(lse_old, lse)
        top = tl.where(top == float("-inf"), 0.0, top)
        w_old = tl.exp(lse_old - top)
        w_new = tl.exp(lse - top)
        w_sum = w_old + w_new
        none = w_sum == 0.0
        w_safe = tl.where(none, 1.0, w_sum)
        out = (o_old * w_old[:, None] + out * w_new[:, None]) / w_safe[:, None]
        lse = tl.where(none, float("-inf"), top + tl.log(w_safe))
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=qmask[:, None])
    tl.store(lse_ptrs, lse, mask=qmask)


# --------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------


@triton.jit
def _bwd_preprocess_kernel(
    O, DO, DLT, T, H,
    stride_ob, stride_ot, stride_oh, stride_dob, stride_dot, stride_doh, stride_lb, stride_lh,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # delta_i = do_i . o_i, the row term of the softmax backward
    pid_t = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = offs_t < T
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_t[:, None] * stride_ot + offs_d[None, :], mask=mask[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_t[:, None] * stride_dot + offs_d[None, :], mask=mask[:, None], other=0.0)
    tl.store(DLT + b * stride_lb + h * stride_lh + offs_t, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=mask)


def _row_delta(out, do):
    B, T, H, D = out.shape
    dlt = torch.empty(B, H, T, dtype=torch.float32, device=out.device)
    BLOCK_T = 64
    _bwd_preprocess_kernel[(triton.cdiv(T, BLOCK_T), B * H)](
        out, do, dlt, T, H,
        out.stride(0), out.stride(1), out.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dlt.stride(0), dlt.stride(1), HEAD_DIM=D, BLOCK_T=BLOCK_T,
    )
    return dlt


@triton.jit
def _dkdv_tiles(
    dk, dv, dck, k, v, ck, offs_n, q_base, do_base, cq_base, lse_base, dlt_base,
    stride_qt, stride_dot, mb_lo, mb_hi, qlen, offs_d,
    BLOCK_M: tl.constexpr, MASK_CAUSAL: tl.constexpr, scale2, PRECISION: tl.constexpr,
):
    # transposed tiles (keys x queries); p as in _dq_tiles, with decays
    # relative to the tile's first query
    for mb in range(mb_lo, mb_hi):
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        qmask = offs_m < qlen
        qT = tl.load(q_base + offs_m[None, :] * stride_qt + offs_d[:, None], mask=qmask[None, :], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=qmask[:, None], other=0.0)
        c_ref = _decay_ref(cq_base, mb * BLOCK_M)
        cq2 = _decay_rel(cq_base, offs_m, qmask, c_ref, True) * 1.4426950408889634
        ck2 = (ck - c_ref).to(tl.float32) * 1.4426950408889634
        # rows past the end get lse = +inf so that their p is exactly 0
        lse2 = tl.load(lse_base + offs_m, mask=qmask, other=float("inf")) * 1.4426950408889634
        dlt = tl.load(dlt_base + offs_m, mask=qmask, other=0.0)
        tT = tl.dot(k, qT, input_precision=PRECISION) * scale2 - ck2[:, None]
        pT = tl.math.exp2(tT + (cq2 - lse2)[None, :])
        if MASK_CAUSAL:
            pT = tl.where(offs_m[None, :] >= offs_n[:, None], pT, 0.0)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dsT = pT * (dpT - dlt[None, :])
        dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=PRECISION)
        dck += tl.sum(dsT, 1)
    return dk, dv, dck


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, CQ, CK, LSE, DLT, QBHI, ORDER, DK, DV, DCK,
    ROW, QROW, QSTART, QLEN, KSTART_POS, KLEN,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dkb, stride_dkt, stride_dkh,
    stride_dvb, stride_dvt, stride_dvh,
    stride_cqb, stride_cqh, stride_ckb, stride_ckh,
    stride_lb, stride_lh,
    stride_dckb, stride_dckh,
    stride_qbhi_s, stride_qbhi_h,
    scale, scale2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, USE_ACP: tl.constexpr, PRECISION: tl.constexpr, ORDERED: tl.constexpr,
):
    pid_n = tl.program_id(0)
    s_id, hk = sequence_and_head(ORDER, ORDERED)
    klen = tl.load(KLEN + s_id)
    if pid_n * BLOCK_N >= klen:
        return
    qlen = tl.load(QLEN + s_id)
    row = tl.load(ROW + s_id).to(tl.int64)
    qrow = tl.load(QROW + s_id).to(tl.int64)
    q0 = tl.load(QSTART + s_id).to(tl.int64)
    k0 = tl.load(KSTART_POS + s_id).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kmask = offs_n < klen
    k = tl.load(K + row * stride_kb + hk * stride_kh + (k0 + offs_n)[:, None] * stride_kt + offs_d[None, :],
                mask=kmask[:, None], other=0.0)
    v = tl.load(V + row * stride_vb + hk * stride_vh + (k0 + offs_n)[:, None] * stride_vt + offs_d[None, :],
                mask=kmask[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    lo, full_lo = first_query_blocks(pid_n, qlen, BLOCK_M, BLOCK_N, CAUSAL)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        ck_base = CK + row * stride_ckb + h * stride_ckh + k0
        # in c's precision; taken relative to each tile's first query
        ck = tl.load(ck_base + offs_n, mask=kmask, other=0.0)
        q_base = Q + qrow * stride_qb + h * stride_qh + q0 * stride_qt
        do_base = DO + qrow * stride_dob + h * stride_doh + q0 * stride_dot
        cq_base = CQ + qrow * stride_cqb + h * stride_cqh + q0
        lse_base = LSE + qrow * stride_lb + h * stride_lh + q0
        dlt_base = DLT + qrow * stride_lb + h * stride_lh + q0
        dck = tl.zeros([BLOCK_N], dtype=tl.float32)
        mid, hi = query_tiles(QBHI, s_id * stride_qbhi_s + h * stride_qbhi_h, pid_n, qlen, klen, full_lo, USE_ACP,
                              BLOCK_M, BLOCK_N, BLOCK_M, BLOCK_N)
        # the diagonal tiles (causal mask), then the kept ones after them
        dk, dv, dck = _dkdv_tiles(dk, dv, dck, k, v, ck, offs_n, q_base, do_base, cq_base, lse_base, dlt_base,
                                  stride_qt, stride_dot, lo, mid, qlen, offs_d, BLOCK_M, CAUSAL, scale2, PRECISION)
        dk, dv, dck = _dkdv_tiles(dk, dv, dck, k, v, ck, offs_n, q_base, do_base, cq_base, lse_base, dlt_base,
                                  stride_qt, stride_dot, mid, hi, qlen, offs_d, BLOCK_M, False, scale2, PRECISION)
        tl.store(DCK + row * stride_dckb + h * stride_dckh + k0 + offs_n, -dck, mask=kmask)
    tl.store(DK + row * stride_dkb + hk * stride_dkh + (k0 + offs_n)[:, None] * stride_dkt + offs_d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=kmask[:, None])
    tl.store(DV + row * stride_dvb + hk * stride_dvh + (k0 + offs_n)[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kmask[:, None])


@triton.jit
def _dq_tiles(
    dq, dcq, q, do, c_ref, p_row2, dlt, k_base, v_base, ck_base, stride_kt, stride_vt,
    kb_lo, kb_hi, klen, k_last, offs_n, offs_d,
    BLOCK_N: tl.constexpr, MASK_POS: tl.constexpr, scale2, PRECISION: tl.constexpr,
):
    # p = exp2(t + p_row2) with t as in _fwd_tiles and p_row2 = c_i - lse
    # (relative decay, log2 units); masks as there
    for kb in range(kb_lo, kb_hi):
        offs_k = kb * BLOCK_N + offs_n
        if MASK_POS:
            kmask = offs_k < klen
            kT = tl.load(k_base + offs_k[None, :] * stride_kt + offs_d[:, None], mask=kmask[None, :], other=0.0)
            vT = tl.load(v_base + offs_k[None, :] * stride_vt + offs_d[:, None], mask=kmask[None, :], other=0.0)
            ck2 = _decay_rel(ck_base, offs_k, kmask, c_ref, True) * 1.4426950408889634
        else:
            kT = tl.load(k_base + offs_k[None, :] * stride_kt + offs_d[:, None])
            vT = tl.load(v_base + offs_k[None, :] * stride_vt + offs_d[:, None])
            ck2 = _decay_rel(ck_base, offs_k, offs_k, c_ref, False) * 1.4426950408889634
        t = tl.dot(q, kT, input_precision=PRECISION) * scale2 - ck2[None, :]
        p = tl.math.exp2(t + p_row2[:, None])
        if MASK_POS:
            p = tl.where(offs_k[None, :] <= k_last[:, None], p, 0.0)
        dp = tl.dot(do, vT, input_precision=PRECISION)
        ds = p * (dp - dlt[:, None])
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=PRECISION)
        dcq += tl.sum(ds, 1)
    return dq, dcq


@triton.jit
def _dq_kernel(
    Q, K, V, DO, O, CQ, CK, LSE, DLT, KBLO, ORDER, DQ, DCQ,
    ROW, QROW, QSTART, QLEN, KSTART_POS, KLEN,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_ob, stride_ot, stride_oh,
    stride_dqb, stride_dqt, stride_dqh,
    stride_cqb, stride_cqh, stride_ckb, stride_ckh,
    stride_lb, stride_lh,
    stride_dcqb, stride_dcqh,
    stride_kblo_s, stride_kblo_h,
    scale, scale2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, USE_ACP: tl.constexpr, PRECISION: tl.constexpr, ACCUMULATE: tl.constexpr,
    DELTA_FROM_O: tl.constexpr, ORDERED: tl.constexpr,
):
    # rows as in _fwd_kernel; ACCUMULATE: DQ (fp32) and DCQ are added to.
    # DELTA_FROM_O: delta = do . o is computed here and written to DLT for
    # the dK / dV kernel, which runs after this one (no separate pass over
    # o and do); else DLT is read.
    # DCQ gets the row sums of dS.  Over all of a row's keys they are zero in
    # exact arithmetic (a softmax row is unchanged by a constant added to all
    # its logits), but delta comes from the rounded o: the row sum is minus
    # that rounding error, which the column sums carry too, and the two
    # cancel in dL/dlog f.  Without the row sums, dlog f moved by 5-11%
    # (relative norm) on an H200 at 8k-16k.
    s_id, h = sequence_and_head(ORDER, ORDERED)
    qlen = tl.load(QLEN + s_id)
    # causal: the last query blocks have the most tiles; launch them first
    pid_m = tl.cdiv(qlen, BLOCK_M) - 1 - tl.program_id(0) if CAUSAL else tl.program_id(0)
    # the grid covers the longest sequence: blocks past this one's end
    if (pid_m < 0) | (pid_m * BLOCK_M >= qlen):
        return
    klen = tl.load(KLEN + s_id)
    row = tl.load(ROW + s_id).to(tl.int64)
    qrow = tl.load(QROW + s_id).to(tl.int64)
    q0 = tl.load(QSTART + s_id).to(tl.int64)
    k0 = tl.load(KSTART_POS + s_id).to(tl.int64)
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    qmask = offs_m < qlen
    q = tl.load(Q + qrow * stride_qb + h * stride_qh + (q0 + offs_m)[:, None] * stride_qt + offs_d[None, :],
                mask=qmask[:, None], other=0.0)
    do = tl.load(DO + qrow * stride_dob + h * stride_doh + (q0 + offs_m)[:, None] * stride_dot + offs_d[None, :],
                 mask=qmask[:, None], other=0.0)
    cq_base = CQ + qrow * stride_cqb + h * stride_cqh + q0
    # decays relative to the block's first query, as in _fwd_kernel
    c_ref = _decay_ref(cq_base, pid_m * BLOCK_M)
    cq2 = _decay_rel(cq_base, offs_m, qmask, c_ref, True) * 1.4426950408889634
    # rows past the end get lse = +inf so that their p is exactly 0
    lse2 = tl.load(LSE + qrow * stride_lb + h * stride_lh + q0 + offs_m, mask=qmask, other=float("inf")) * 1.4426950408889634
    p_row2 = cq2 - lse2
    dlt_ptrs = DLT + qrow * stride_lb + h * stride_lh + q0 + offs_m
    if DELTA_FROM_O:
        o = tl.load(O + qrow * stride_ob + h * stride_oh + (q0 + offs_m)[:, None] * stride_ot + offs_d[None, :],
                    mask=qmask[:, None], other=0.0)
        dlt = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(dlt_ptrs, dlt, mask=qmask)
    else:
        dlt = tl.load(dlt_ptrs, mask=qmask, other=0.0)
    k_base = K + row * stride_kb + hk * stride_kh + k0 * stride_kt
    v_base = V + row * stride_vb + hk * stride_vh + k0 * stride_vt
    ck_base = CK + row * stride_ckb + h * stride_ckh + k0
    lo, mid, hi = key_tiles(KBLO, s_id, h, pid_m, qlen, klen, stride_kblo_s, stride_kblo_h, BLOCK_M, BLOCK_N,
                            BLOCK_M, BLOCK_N, CAUSAL, USE_ACP)
    k_last = _last_keys(offs_m, klen, CAUSAL)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dcq = tl.zeros([BLOCK_M], dtype=tl.float32)
    # unmasked and masked tiles in the order of _fwd_kernel
    dq, dcq = _dq_tiles(dq, dcq, q, do, c_ref, p_row2, dlt, k_base, v_base, ck_base, stride_kt, stride_vt,
                        lo, mid, klen, k_last, offs_n, offs_d, BLOCK_N, False, scale2, PRECISION)
    dq, dcq = _dq_tiles(dq, dcq, q, do, c_ref, p_row2, dlt, k_base, v_base, ck_base, stride_kt, stride_vt,
                        mid, hi, klen, k_last, offs_n, offs_d, BLOCK_N, True, scale2, PRECISION)
    dq_ptrs = DQ + qrow * stride_dqb + h * stride_dqh + (q0 + offs_m)[:, None] * stride_dqt + offs_d[None, :]
    dq = dq * scale
    if ACCUMULATE:
        dq += tl.load(dq_ptrs, mask=qmask[:, None], other=0.0)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=qmask[:, None])
    dcq_ptrs = DCQ + qrow * stride_dcqb + h * stride_dcqh + q0 + offs_m
    if ACCUMULATE:
        dcq += tl.load(dcq_ptrs, mask=qmask, other=0.0)
    tl.store(dcq_ptrs, dcq, mask=qmask)


# --------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------


class _PairTable:
    """(row, query start, query length, key start, key length) per sequence.

    ``row`` indexes the batch of the keys (K, V, their decays and
    gradients), ``qrow`` that of the queries (Q, their decays, O, LSE, dO
    and the query gradients): the same tensor unless a context-parallel pair
    reads selected query rows of whole tensors in place (``with_query_rows``)."""

    def __init__(self, row, qstart, qlen, kstart, klen, max_qlen, max_klen, qrow=None, order_q=None,
                 order_kv=None):
        self.row, self.qstart, self.qlen, self.kstart, self.klen = row, qstart, qlen, kstart, klen
        self.qrow = row if qrow is None else qrow
        self.max_qlen, self.max_klen = max_qlen, max_klen
        # launch orders of the (entry, query head) and (entry, key / value
        # head) programs (heavy_first), or None: the grid's own
        self.order_q, self.order_kv = order_q, order_kv

    @staticmethod
    def self_attention(seqs):
        return _PairTable(seqs.row, seqs.start, seqs.length, seqs.start, seqs.length, seqs.max_len, seqs.max_len)

    @staticmethod
    def chunks(batch, tq, tk, device):
        return _chunk_table(batch, tq, tk, torch.device(device))

    @staticmethod
    def segments(seg, device):
        """Packed documents: one entry per (row, document) piece of a chunk
        pair (interface.ChunkSegments); entries cover disjoint queries and
        disjoint keys, so their stores never overlap."""
        mv = lambda t: t.to(device=device, dtype=torch.int32).contiguous()  # noqa: E731
        return _PairTable(mv(seg.row), mv(seg.qstart), mv(seg.qlen), mv(seg.kstart), mv(seg.klen),
                          seg.max_qlen, seg.max_klen)

    def launched_in(self, order_q, order_kv):
        """The same entries, their programs launched in these orders."""
        return _PairTable(self.row, self.qstart, self.qlen, self.kstart, self.klen, self.max_qlen, self.max_klen,
                          qrow=self.qrow, order_q=order_q, order_kv=order_kv)

    def launch_order(self, kv: bool = False):
        """(ORDER, ORDERED) arguments of a launch over the query heads'
        programs (kv: the key / value heads'): the table's order, or
        without one a stand-in pointer that the kernel does not read."""
        order = self.order_kv if kv else self.order_q
        return (self.row if order is None else order), order is not None

    def with_query_rows(self, qrow):
        """The same entries reading queries at batch rows ``qrow`` (int32, one per entry)."""
        return _PairTable(self.row, self.qstart, self.qlen, self.kstart, self.klen, self.max_qlen, self.max_klen,
                          qrow=qrow)


@functools.lru_cache(maxsize=64)
def _chunk_table(batch, tq, tk, device):
    # one table per shape: a ring step makes several calls of the same shapes,
    # and the kernels only read the table
    row = torch.arange(batch, dtype=torch.int32, device=device)
    zero = torch.zeros(batch, dtype=torch.int32, device=device)
    return _PairTable(row, zero, torch.full_like(zero, tq), zero, torch.full_like(zero, tk), tq, tk)


def _precision(dtype):
    # fp32 inputs get three-pass tf32 products (about fp32 accuracy on the
    # tensor cores; plain fp32 FMA tiles of this size take minutes to
    # compile); fp16/bf16 inputs use the tensor cores as they are
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _check_unit_stride(*ts):
    return [t if t.stride(-1) == 1 else t.contiguous() for t in ts]


def _forward(q, k, v, c_q, c_k, pairs, scale, thr, causal, partial=False, acc=None, count_tiles=True,
             for_backward=False, allow_gluon=False):
    """q/k/v: bshd views; c_q/c_k: [B, H, T] float32, or float64 for precise
    decays (``decay_precision``).  Returns out, lse, kblo,
    tiles (kept and total tiles per sequence and head, int32 [S, H, 2]; None
    without ACP), qbhi (with ACP and ``for_backward``: the dK / dV kernel's
    boundaries, found in the same launch as the forward's; else None),
    orders (with ACP and counted tiles: the launch order of the query
    heads' programs and, for the backward, of the key / value heads'
    (``heavy_first``); else None).
    partial: the table may leave queries uncovered (packed chunk pairs):
    those keep out = 0, lse = -inf.
    acc: (out fp32, lse) shaped like q's output, a partial result that this
    one is merged into in place (context-parallel accumulation).
    count_tiles=False: no statistics (tiles is None).
    allow_gluon: the Gluon forward may run the call (gluon_fwd.supported)
    instead of _fwd_kernel."""
    q, k, v = _check_unit_stride(q, k, v)
    B, Tq, Hq, D = q.shape
    group = Hq // k.shape[2]
    BM, BN, warps, stages = kernel_config("fwd", D, q.dtype)
    use_acp = thr is not None
    if acc is not None:
        out, lse = acc
    elif partial:
        out = torch.zeros_like(q)
        lse = torch.full((B, Hq, Tq), float("-inf"), dtype=torch.float32, device=q.device)
    else:
        out = torch.empty_like(q)
        lse = torch.empty(B, Hq, Tq, dtype=torch.float32, device=q.device)
    S = pairs.row.numel()
    if S == 0:
        return out, lse, None, None, None, None
    kblo = tiles = qbhi = orders = None
    if use_acp:
        tiles = torch.empty(S, Hq, 2, dtype=torch.int32, device=q.device) if count_tiles else None
        kblo, qbhi = block_boundaries(c_q, c_k, pairs, thr, BM, BN, causal, want_kblo=True, tiles=tiles,
                                      want_qbhi=for_backward, qbhi_blocks=kernel_config("dkdv", D, q.dtype)[:2])
        if tiles is not None and ORDER_BY_KEPT_TILES and S * Hq > 1:
            order = heavy_first(tiles)
            # the dK / dV pass has a program per key / value head (none
            # runs when no backward follows)
            if group == 1:
                kv_order = order
            else:
                kv_order = heavy_first(tiles, group) if for_backward else None
            orders = (order, kv_order)
            pairs = pairs.launched_in(*orders)
    if (USE_GLUON_FWD and allow_gluon and acc is None and gluon_fwd.supported(q, k, v, out)
            and _run_gluon("USE_GLUON_FWD", gluon_fwd.launch_fwd, q, k, v, c_q, c_k, out, lse, thr, kblo, pairs,
                           scale, causal, group, (BM, BN))):
        return out, lse, kblo, tiles, qbhi, orders
    grid = (triton.cdiv(max(pairs.max_qlen, 1), BM), S, Hq)
    kb = kblo if use_acp else pairs.row.view(1, 1, -1)
    order, ordered = pairs.launch_order()
    _fwd_kernel[grid](
        q, k, v, c_q, c_k, out, lse, kb, order,
        pairs.row, pairs.qrow, pairs.qstart, pairs.qlen, pairs.kstart, pairs.klen,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        c_q.stride(0), c_q.stride(1), c_k.stride(0), c_k.stride(1),
        lse.stride(0), lse.stride(1),
        kb.stride(0), kb.stride(1),
        scale * LOG2E,
        PRECISION=_precision(q.dtype), GROUP=group, HEAD_DIM=D, BLOCK_M=BM, BLOCK_N=BN, CAUSAL=causal, USE_ACP=use_acp,
        ACCUMULATE=acc is not None, ORDERED=ordered, num_warps=warps, num_stages=stages,
    )
    return out, lse, kblo, tiles, qbhi, orders


def _backward(do, q, k, v, c_q, c_k, out, lse, pairs, scale, thr, causal, kblo=None, partial=False,
              delta=None, dq_acc=None, kv_grad_dtype=None, qbhi=None, allow_gluon=False):
    """Returns dq, dk, dv, dc_q [B, Hq, Tq], dc_k [B, Hq, Tk] (fp32).
    partial: queries / keys the table leaves uncovered get zero gradients.
    delta: the rows' do . out [B, Hq, Tq] fp32, laid out like lse (then
    ``out`` is not read); kblo / qbhi: the forward's boundaries
    (``_forward``), found again when not given; dq_acc: (dq fp32, dc_q)
    that the query gradients are added to in place (context-parallel
    accumulation); kv_grad_dtype: dk and dv are written in it (contiguous),
    else in k's dtype.  Programs launch in the table's orders (the
    forward's, ``_PairTable.launched_in``) when it has them."""
    do, q, k, v = _check_unit_stride(do, q, k, v)
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    group = Hq // Hkv
    use_acp = thr is not None
    lse = lse.contiguous() if lse.stride(-1) != 1 else lse
    if delta is None:
        lse = lse.contiguous()
        dlt = torch.empty_like(lse)  # written by the dQ kernel
        o_arg = _check_unit_stride(out)[0]
    else:
        o_arg = do  # not read
        # the kernels read delta with lse's strides (dims of size 1 aside)
        if any(a != b for a, b, n in zip(delta.stride(), lse.stride(), lse.shape) if n > 1):
            lse, delta = lse.contiguous(), delta.contiguous()
        dlt = delta
    new = torch.zeros_like if partial else torch.empty_like
    if kv_grad_dtype is None:
        dk, dv = new(k), new(v)
    else:
        alloc = torch.zeros if partial else torch.empty
        dk = alloc(k.shape, dtype=kv_grad_dtype, device=k.device)
        dv = alloc(v.shape, dtype=kv_grad_dtype, device=v.device)
    if dq_acc is None:
        dq = new(q)
        dc_q = torch.zeros(B, Hq, Tq, dtype=torch.float32, device=q.device)
    else:
        dq, dc_q = dq_acc
    dc_k = torch.zeros(k.shape[0], Hq, Tk, dtype=torch.float32, device=q.device)
    S = pairs.row.numel()
    if S == 0:
        return dq, dk, dv, dc_q, dc_k
    scale2 = scale * LOG2E
    (order_q, ordered_q), (order_kv, ordered_kv) = pairs.launch_order(), pairs.launch_order(kv=True)
    BM1, BN1, w1, st1 = kernel_config("dkdv", D, q.dtype)
    gluon_mode = (gluon_bwd.mode(q, k, v, do, use_acp) if USE_GLUON_DKDV and allow_gluon and not partial
                  and kv_grad_dtype is None and gluon_bwd.takes_boundaries(D, BM1, BN1) else None)
    # the dK / dV pass's boundaries (every path below has one)
    if use_acp and qbhi is None:
        _, qbhi = block_boundaries(c_q, c_k, pairs, thr, BM1, BN1, causal, want_kblo=False, want_qbhi=True)
    if (gluon_mode == "fused" and USE_GLUON_FUSED_DQ and dq_acc is None
            and not torch.are_deterministic_algorithms_enabled()):
        # one kernel for all three gradients (gluon_bwd.py): delta first
        dlt_f = _row_delta(o_arg, do) if delta is None else dlt
        dq32 = torch.zeros(B, Tq, Hq, D, dtype=torch.float32, device=q.device)
        dcq16 = torch.zeros(B, Tq, Hq, 16, dtype=torch.float32, device=q.device)
        if _run_gluon("USE_GLUON_FUSED_DQ", gluon_bwd.launch_dkdv, q, k, v, do, c_q, c_k, lse, dlt_f, thr, qbhi, dk,
                      dv, dc_k, pairs, scale, causal, group, (BM1, BN1), (dq32, dcq16)):
            dq.copy_(dq32)
            dc_q.copy_(dcq16[..., 0].permute(0, 2, 1))
            return dq, dk, dv, dc_q, dc_k

    # dQ first: it computes delta (when not given), which dK / dV reads
    BM2, BN2, w2, st2 = kernel_config("dq", D, q.dtype)
    if use_acp and (kblo is None or (BM2, BN2) != fwd_blocks(D, q.dtype)):
        kblo, _ = block_boundaries(c_q, c_k, pairs, thr, BM2, BN2, causal, want_kblo=True)
    kb = kblo if use_acp else pairs.row.view(1, 1, -1)
    _dq_kernel[(triton.cdiv(max(pairs.max_qlen, 1), BM2), S, Hq)](
        q, k, v, do, o_arg, c_q, c_k, lse, dlt, kb, order_q, dq, dc_q,
        pairs.row, pairs.qrow, pairs.qstart, pairs.qlen, pairs.kstart, pairs.klen,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        o_arg.stride(0), o_arg.stride(1), o_arg.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        c_q.stride(0), c_q.stride(1), c_k.stride(0), c_k.stride(1),
        lse.stride(0), lse.stride(1),
        dc_q.stride(0), dc_q.stride(1),
        kb.stride(0), kb.stride(1),
        scale, scale2,
        PRECISION=_precision(q.dtype), GROUP=group, HEAD_DIM=D, BLOCK_M=BM2, BLOCK_N=BN2, CAUSAL=causal, USE_ACP=use_acp,
        ACCUMULATE=dq_acc is not None, DELTA_FROM_O=delta is None, ORDERED=ordered_q, num_warps=w2,
        num_stages=st2,
    )
    if gluon_mode and _run_gluon("USE_GLUON_DKDV", gluon_bwd.launch_dkdv, q, k, v, do, c_q, c_k, lse, dlt, thr,
                                 qbhi, dk, dv, dc_k, pairs, scale, causal, group, (BM1, BN1)):
        return dq, dk, dv, dc_q, dc_k
    qb = qbhi if use_acp else pairs.row.view(1, 1, -1)
    _dkdv_kernel[(triton.cdiv(max(pairs.max_klen, 1), BN1), S, Hkv)](
        q, k, v, do, c_q, c_k, lse, dlt, qb, order_kv, dk, dv, dc_k,
        pairs.row, pairs.qrow, pairs.qstart, pairs.qlen, pairs.kstart, pairs.klen,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        c_q.stride(0), c_q.stride(1), c_k.stride(0), c_k.stride(1),
        lse.stride(0), lse.stride(1),
        dc_k.stride(0), dc_k.stride(1),
        qb.stride(0), qb.stride(1),
        scale, scale2,
        PRECISION=_precision(q.dtype), GROUP=group, HEAD_DIM=D, BLOCK_M=BM1, BLOCK_N=BN1, CAUSAL=causal, USE_ACP=use_acp,
        ORDERED=ordered_kv, num_warps=w1, num_stages=st1,
    )
    return dq, dk, dv, dc_q, dc_k


class ForgettingAttentionFunction(torch.autograd.Function):
    """Causal forgetting attention over (packed) sequences; see interface.py."""

    @staticmethod
    def forward(ctx, q, k, v, log_fgate, seqs, scale, thr, precise_decay=False):
        # [B, H, T] (float64 if precise), time innermost: the kernels read c along time
        c = cumulative_decay(log_fgate.detach(), seqs, precise_decay)
        pairs = _PairTable.self_attention(seqs)
        out, lse, kblo, tiles, qbhi, orders = _forward(q, k, v, c, c, pairs, scale, thr, causal=True,
                                                       for_backward=any(ctx.needs_input_grad[:4]), allow_gluon=True)
        ctx.save_for_backward(q, k, v, out, lse, c, thr, kblo, qbhi)
        ctx.seqs, ctx.scale, ctx.orders = seqs, scale, orders
        ctx.mark_non_differentiable(tiles) if tiles is not None else None
        return out, tiles

    @staticmethod
    def backward(ctx, do, _dtiles=None):
        q, k, v, out, lse, c, thr, kblo, qbhi = ctx.saved_tensors
        seqs = ctx.seqs
        pairs = _PairTable.self_attention(seqs)
        if ctx.orders is not None:
            pairs = pairs.launched_in(*ctx.orders)
        dq, dk, dv, dc_q, dc_k = _backward(do, q, k, v, c, c, out, lse, pairs, ctx.scale, thr, True, kblo,
                                           qbhi=qbhi, allow_gluon=True)
        dlogf = cumulative_decay_grad(dc_q, dc_k, seqs)  # [B, T, H]
        return dq, dk, dv, dlogf, None, None, None, None


def _chunk_pairs(q, k, segments, query_rows=None):
    """Pair table of a chunk pair; with ``query_rows``, key row n reads its
    queries at batch row query_rows[n]."""
    if segments is None:
        pairs = _PairTable.chunks(k.shape[0], q.shape[1], k.shape[1], q.device)
    else:
        pairs = _PairTable.segments(segments, q.device)
    if query_rows is None:
        return pairs
    qrow = query_rows.to(device=q.device, dtype=torch.int32)
    # an entry per key row, or per document piece of a key row
    return pairs.with_query_rows(qrow if segments is None else qrow.index_select(0, pairs.row.long()))


def chunk_forward(q, k, v, c_q, c_k, causal, scale, thr, segments=None):
    pairs = _chunk_pairs(q, k, segments)
    c_q, c_k = decay_precision(c_q, c_k)
    thr = thr.float().contiguous() if thr is not None else None
    out, lse, _, _, _, _ = _forward(q, k, v, c_q, c_k, pairs, scale, thr, causal, partial=segments is not None,
                                    count_tiles=False)
    return out, lse


def chunk_forward_into(acc_out, acc_lse, q, k, v, c_q, c_k, query_rows, causal, scale, thr, segments=None):
    pairs = _chunk_pairs(q, k, segments, query_rows)
    thr = thr.float().contiguous() if thr is not None else None
    _forward(q, k, v, *decay_precision(c_q, c_k), pairs, scale, thr, causal, acc=(acc_out, acc_lse),
             count_tiles=False)


def chunk_backward(do, q, k, v, c_q, c_k, out, lse, causal, scale, thr, segments=None):
    pairs = _chunk_pairs(q, k, segments)
    thr = thr.float().contiguous() if thr is not None else None
    return _backward(do, q, k, v, *decay_precision(c_q, c_k), out, lse, pairs, scale, thr, causal,
                     partial=segments is not None)


def chunk_backward_into(dq_acc, dcq_acc, do, q, k, v, c_q, c_k, lse, delta, query_rows, causal, scale, thr,
                        segments=None, kv_grad_dtype=None):
    pairs = _chunk_pairs(q, k, segments, query_rows)
    thr = thr.float().contiguous() if thr is not None else None
    _, dk, dv, _, dc_k = _backward(do, q, k, v, *decay_precision(c_q, c_k), None, lse, pairs, scale, thr, causal,
                                   partial=segments is not None, delta=delta, dq_acc=(dq_acc, dcq_acc),
                                   kv_grad_dtype=kv_grad_dtype)
    return dk, dv, dc_k


def row_delta(out, do):
    """do . out per query: [B, H, T] float32 (out, do: bshd)."""
    out, do = _check_unit_stride(out, do)
    return _row_delta(out, do)
