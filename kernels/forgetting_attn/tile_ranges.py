"""Which tiles a program visits: the key tiles of a query block (forward and
dQ pass) and the query blocks of a key block (dK / dV pass).  The Triton
kernels of triton_ops.py and the Gluon kernels of gluon_fwd.py /
gluon_bwd.py all call these @triton.jit helpers, so that they cannot drift
apart; the Gluon kernels' tiles are whole numbers of the Triton tiles in
which ACP's boundaries are found (ACP_BLOCK_M x ACP_BLOCK_N).

ACP skips whole tiles only (a tile whose largest decay is below the
threshold, DESIGN.md section 1's block rule); the tiles it keeps are
computed in full, as in the ACP paper's kernels, so a program's tiles are
the unmasked ones followed by the diagonal ones that need the causal mask,
with or without ACP."""

import triton
import triton.language as tl


@triton.jit
def sequence_and_head(ORDER, ORDERED: tl.constexpr):
    """(sequence, head) of this program, from grid axes 1 and 2.  ORDERED:
    the grid's (sequence, head) slots, in the order the GPU launches them,
    take the pairs that ORDER lists (s + S * h, most kept tiles first:
    triton_ops.heavy_first), so that under ACP the longest programs start
    first whatever the heads' order, and the last wave is short."""
    return pair_of_slot(ORDER, ORDERED, tl.program_id(1), tl.program_id(2), tl.num_programs(1))


@triton.jit
def pair_of_slot(ORDER, ORDERED: tl.constexpr, slot_s, slot_h, S):
    """(sequence, head) that takes launch slot (slot_s, slot_h) of S
    sequences: the slot itself, or with ORDERED the pair ORDER lists there
    (``sequence_and_head``; the persistent forward walks the slots itself)."""
    if ORDERED:
        sh = tl.load(ORDER + slot_s + S * slot_h)
        s_id = sh % S
        h = sh // S
    else:
        s_id = slot_s
        h = slot_h
    return s_id, h


@triton.jit
def work_item(w, total, num_m, S, ORDER, QLEN, ORDERED: tl.constexpr, CAUSAL: tl.constexpr,
              BLOCK_M: tl.constexpr):
    """(sequence, head, query block, the sequence's query length, valid) of
    item w of a persistent kernel's (query block, sequence, head) items,
    numbered in the order the GPU launches a per-block grid (num_m, S,
    heads): query blocks fastest (when causal, the longest first), then the
    (sequence, head) slot as ``sequence_and_head`` maps it.  valid: w < total
    and the block holds queries (the grid covers the longest sequence)."""
    wc = tl.minimum(w, total - 1)
    x = wc % num_m
    slot = wc // num_m
    s_id, h = pair_of_slot(ORDER, ORDERED, slot % S, slot // S, S)
    qlen = tl.load(QLEN + s_id)
    if CAUSAL:
        pid_m = tl.cdiv(qlen, BLOCK_M) - 1 - x
    else:
        pid_m = x
    valid = (w < total) & (pid_m >= 0) & (pid_m * BLOCK_M < qlen)
    return s_id, h, pid_m, qlen, valid


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
def query_tiles(QBHI, qb_off, pid_n, qlen, klen, full_lo, USE_ACP: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, ACP_BLOCK_M: tl.constexpr, ACP_BLOCK_N: tl.constexpr):
    """(mid, hi) of one head: [lo, mid) the diagonal tiles (causal mask),
    [mid, hi) the kept tiles after them.  qbhi (at qb_off) holds each key
    block's end of kept query blocks in ACP_BLOCK_M x ACP_BLOCK_N tiles, of
    which BLOCK_M x BLOCK_N tiles are whole numbers: a key block's queries
    end where its last part's do."""
    if USE_ACP:
        RM: tl.constexpr = BLOCK_M // ACP_BLOCK_M
        RN: tl.constexpr = BLOCK_N // ACP_BLOCK_N
        hi = tl.load(QBHI + qb_off + pid_n * RN)
        for j in tl.static_range(1, RN):
            n = pid_n * RN + j
            if n * ACP_BLOCK_N < klen:
                hi = tl.maximum(hi, tl.load(QBHI + qb_off + n))
        hi = tl.cdiv(hi, RM)
    else:
        hi = tl.cdiv(qlen, BLOCK_M)
    mid = tl.minimum(full_lo, hi)
    return mid, hi


@triton.jit
def key_tiles(KBLO, s_id, h, pid_m, qlen, klen, stride_kblo_s, stride_kblo_h, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, ACP_BLOCK_M: tl.constexpr, ACP_BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
              USE_ACP: tl.constexpr):
    """The key tiles of query block pid_m: [lo, mid) unmasked, [mid, hi)
    the diagonal / ragged-edge ones that need the causal and length masks.
    kblo holds each query block's first kept key tile in ACP_BLOCK_M x
    ACP_BLOCK_N tiles; BLOCK_M divides ACP_BLOCK_M and BLOCK_N is a whole
    number of ACP_BLOCK_N (a tile is kept when any of its parts is)."""
    if CAUSAL:
        hi = (tl.minimum((pid_m + 1) * BLOCK_M, qlen) - 1) // BLOCK_N + 1
        mid = (pid_m * BLOCK_M) // BLOCK_N
    else:
        hi = tl.cdiv(klen, BLOCK_N)
        mid = klen // BLOCK_N
    if USE_ACP:
        R: tl.constexpr = BLOCK_N // ACP_BLOCK_N
        pm = pid_m // (ACP_BLOCK_M // BLOCK_M)
        lo = tl.load(KBLO + s_id * stride_kblo_s + h * stride_kblo_h + pm) // R
    else:
        lo = 0
    mid = tl.maximum(mid, lo)
    return lo, mid, hi
