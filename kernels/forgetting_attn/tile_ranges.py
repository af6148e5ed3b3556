"""Which tiles a program visits: the key tiles of a query block (forward and
dQ pass) and the query blocks of a key block (dK / dV pass).  The Triton
kernels of triton_ops.py and the Gluon kernels of gluon_fwd.py /
gluon_bwd.py all call these @triton.jit helpers, so that they cannot drift
apart; the Gluon kernels' tiles are whole numbers of the Triton tiles in
which ACP's boundaries are found (ACP_BLOCK_M x ACP_BLOCK_N)."""

import triton
import triton.language as tl


@triton.jit
def first_query_blocks(pid_n, qlen, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """(lo, full_lo) of key block pid_n: causal, the first query block that
    sees any of its keys and the first whose every row is at or after every
    key here; (0, 0) otherwise."""
    if CAUSAL:
        lo = (pid_n * BLOCK_N) // BLOCK_M
        full_lo = tl.minimum(tl.cdiv((pid_n + 1) * BLOCK_N, BLOCK_M), tl.cdiv(qlen, BLOCK_M))
    else:
        lo = 0
        full_lo = 0
    return lo, full_lo


@triton.jit
def query_tiles(QBHI, qb_off, stride_qbhi_r, pid_n, qlen, klen, full_lo, USE_ACP: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACP_BLOCK_M: tl.constexpr, ACP_BLOCK_N: tl.constexpr):
    """(mid, part_lo, hi) of one head: [lo, mid) the diagonal tiles, [mid,
    part_lo) fully kept, [part_lo, hi) ACP's tiles that may hold pruned pairs
    (the smallest decay of tile (m, n) is at (last query, first key)).  qbhi
    (at qb_off) holds each key block's end and first not fully kept query
    block in ACP_BLOCK_M x ACP_BLOCK_N tiles, of which BLOCK_M x BLOCK_N
    tiles are whole numbers: a key block's queries end where its last
    part's do, and are fully kept only where every part's are."""
    num_m = tl.cdiv(qlen, BLOCK_M)
    if USE_ACP:
        RM: tl.constexpr = BLOCK_M // ACP_BLOCK_M
        RN: tl.constexpr = BLOCK_N // ACP_BLOCK_N
        hi = tl.load(QBHI + qb_off + pid_n * RN)
        full_q = tl.load(QBHI + qb_off + stride_qbhi_r + pid_n * RN)
        for j in tl.static_range(1, RN):
            n = pid_n * RN + j
            if n * ACP_BLOCK_N < klen:
                hi = tl.maximum(hi, tl.load(QBHI + qb_off + n))
                full_q = tl.minimum(full_q, tl.load(QBHI + qb_off + stride_qbhi_r + n))
        hi = tl.cdiv(hi, RM)
        part_lo = tl.minimum(tl.maximum(full_q // RM, full_lo), hi)
    else:
        hi = num_m
        part_lo = num_m
    mid = tl.minimum(full_lo, hi)
    part_lo = tl.maximum(part_lo, mid)
    return mid, part_lo, hi


@triton.jit
def key_tiles(THR, KBLO, s_id, h, pid_m, qlen, klen, cq2, stride_thr_s, stride_kblo_s, stride_kblo_h,
              stride_kblo_r, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACP_BLOCK_M: tl.constexpr,
              ACP_BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, USE_ACP: tl.constexpr):
    """The key tiles of query block pid_m: [lo, full_lo) may hold pruned
    pairs, [full_lo, mid) is fully kept and unmasked, [mid, hi) needs the
    causal / bounds masks.  Also ck_min2, the largest relative key decay a
    row keeps (log2 units).  kblo holds each query block's first kept and
    first fully kept key tile in ACP_BLOCK_M x ACP_BLOCK_N tiles; BLOCK_M
    divides ACP_BLOCK_M and BLOCK_N is a whole number of ACP_BLOCK_N."""
    if CAUSAL:
        hi = (tl.minimum((pid_m + 1) * BLOCK_M, qlen) - 1) // BLOCK_N + 1
        mid = (pid_m * BLOCK_M) // BLOCK_N
    else:
        hi = tl.cdiv(klen, BLOCK_N)
        mid = klen // BLOCK_N
    if USE_ACP:
        R: tl.constexpr = BLOCK_N // ACP_BLOCK_N
        pm = pid_m // (ACP_BLOCK_M // BLOCK_M)
        thr = tl.load(THR + s_id * stride_thr_s + h)
        lo = tl.load(KBLO + s_id * stride_kblo_s + h * stride_kblo_h + pm) // R
        # past the tiles whose smallest decay (last query, first key) is
        # below the threshold (usually a handful, found by the boundary
        # kernel: a walk here waited on one dependent load per tile)
        part = tl.load(KBLO + s_id * stride_kblo_s + h * stride_kblo_h + stride_kblo_r + pm)
        full_lo = tl.maximum(tl.minimum(tl.cdiv(part, R), mid), lo)
        # kept: c_i - c_j >= delta, i.e. the key's relative decay at most this
        ck_min2 = cq2 - thr * 1.4426950408889634
    else:
        lo = 0
        full_lo = 0
        ck_min2 = cq2
    mid = tl.maximum(mid, lo)
    return lo, full_lo, mid, hi, ck_min2
