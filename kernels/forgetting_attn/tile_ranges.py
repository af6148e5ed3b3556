"""Which query blocks a dK / dV key block visits: the arithmetic shared by
triton_ops._dkdv_kernel and the Gluon kernel of gluon_bwd.py (both call
these @triton.jit helpers, so that the two cannot drift apart)."""

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
