"""Hopper backward kernel in Gluon: warp-specialised, with TMA loads and register-operand MMAs.

The backward's dK / dV pass (triton_ops._dkdv_kernel) is about half of a
forgetting-attention training step.  This kernel does the same work the way
FlashAttention-3 (Shah et al., 2024) does it on Hopper:

- a CTA owns BLOCK_N = 128 keys of one key/value head; K and V stay in
  shared memory, dK and dV accumulate in the registers of two MMA
  warpgroups (64 keys each: wgmma's M), which share every Q / dO tile;
- one load warp streams the query blocks' Q and dO tiles by TMA into a
  ring of STAGES shared buffers (ready / empty mbarriers, as in
  gluon_fwd.py), for every query head of the GQA group in turn;
- the MMA warps compute S^T = K Q^T, build P^T, then run dP^T = V dO^T
  and dV += P^T dO as asynchronous wgmma, build dS^T as soon as dP^T is
  in and add dK += dS^T Q; P^T and dS^T are register operands (no trip
  through shared memory).  The query blocks' row terms (decays,
  log-sum-exps, deltas) are loaded a block ahead, one value a thread, and
  spread over the MMA layout's columns when used: loaded in that layout
  (16 loads a thread each) their latency stalled every tile, and the
  kernel alone was 5-6% slower without ACP, 3% with it
  (gluon_dkdv_row_prefetch_h200.json; outputs within one bf16 rounding:
  the terms no longer fold into the exponent's arithmetic the same way).
  Issuing dP^T beside S^T (to overlap it with
  P^T) made the kernel spill; deferring dK += dS^T Q into the next tile
  (FlashAttention-3's intra-warpgroup overlap) was slower;
- it launches at 168 registers a thread, one CTA per SM; setmaxnreg gives
  the MMA warps 240 and the load and write warps 24 each (when measured,
  40 for the load warp made the kernel spill 88 bytes instead of 36 and,
  without FUSED_DQ, 11% slower at 8k without ACP).

With FUSED_DQ it computes dQ too, so that the dQ kernel (which recomputes
S and dP) does not run: dS^T goes to shared memory, where it is the A
operand of dK += dS^T Q, of dQ = dS K (each warpgroup half of the head
dim over all 128 keys) and of dS times a block of ones, whose first column
is dc_q's row sums of dS (taken in registers, by a reduction across the
warps, they made the kernel spill and the backward twice as slow).
dQ and the row sums go to shared memory while dK's MMA runs, and a write
warp adds them to float32 buffers by TMA reduce-adds, as FlashAttention-3's
dQ writer does: the MMA warps wait for the write warp only if it is still
sending the last tile's.  (Scalar dQ atomics were slower; the row sums'
atomics from the MMA warps cost 4 of the kernel's 11.6 ms at 8k without
ACP, where the write warp's reduce-adds cost about 0.3 of 8.3 ms.)  dc_k's
column sums are then taken from the same bf16 dS, so that dL/dlog f sums
dS over the pairs that cross each token in one rounding (the rest cancels).

Everything else follows triton_ops._dkdv_kernel: the pair table, the query
block ranges (tile_ranges.py, called by both kernels: [lo, mid) diagonal,
[mid, hi) the kept tiles after them), decays relative to each query block's
first query, lse = +inf for rows past the end (their p is exactly 0) and the
one-compare causal mask.  ACP's boundaries (qbhi) come in the Triton
kernel's tiles (ACP_BLOCK_M x ACP_BLOCK_N) and are widened to this kernel's:
a key block's queries end where its last part's do.

Measured on an H200 against the Triton kernels (DISPATCH says what runs):
at head dim 128 the fwd + bwd step 5.6-8.5% faster (8k and 16k, with and
without ACP; benchmarks/results/attention_gluon_dkdv_h200.json), and with
ACP the fused dQ 3.5-3.8% faster again (attention_fused_dq_h200.json).
With the write warp (attention_dq_writer_h200.json) the fused dQ makes the
ACP step 8.4-9.3% faster than this kernel after the dQ kernel, and without
ACP 4.5-4.8% slower then.  Since the row terms' prefetch and the TMA
prologue it is faster without ACP as well: the 16 x 128 step 6.4% / 6.6%
faster at 8k / 16k, and 9.2% / 8.4% with ACP
(attention_fused_dq_dense_prefetch_h200.json, 2 interleaved rounds), so
head dim 128 runs it with and without ACP.  At head dim 64 the first
version of this kernel made the step 3% slower without ACP and 3.9-4.5%
faster with it (attention_gluon_dkdv_d64_h200.json).  The current one makes the
24 x 64 step 9.9% / 8.9% faster at 8k / 16k without ACP and 7.2% / 7.7%
with it (attention_gluon_dkdv_d64_dense_h200.json), so it runs there with
and without ACP; the fused dQ is 0.7% slower to 0.5% faster than it
without ACP and 2.4-2.9% slower with it (attention_fused_dq_d64_prefetch_h200.json),
and, since the row terms go through shared memory, 0.9-1.7% slower without
ACP and 2.1-2.8% with it (attention_fused_dq_d64_rowterms_h200.json).
(attention_gluon_dkdv_d64_prefetch_h200.json's rows without ACP ran the
Triton kernel on both sides: DISPATCH had None there.)

Where it runs without the fused dQ (head dim 64), it runs persistent
(_dkdv_kernel_sm90_persistent, PERSISTENT_HEAD_DIMS): one CTA per SM takes
key blocks from a counter, as gluon_fwd's persistent forward takes query
blocks (FlashAttention-3's dynamic persistent scheduler), with K and V
double-buffered so that the next block's K, V and first Q / dO tiles load
while the MMA warps finish the current one.  Gradients are the per-block
kernel's bit for bit.  Against the per-block kernel (whole step, 24 x 64,
2 alternating rounds, persistent_dkdv_ab_h200.json): with ACP 1.4% / 2.6%
faster at 8k / 16k, without it -0.6% / +0.1%; the dK / dV pass keeps 0.585
of its dense time for 0.572 of the tiles at 8k (0.594 per block;
acp_probe_8192_persistent_dkdv_h200.json).  Not measured at head dim 128,
where the fused dQ runs.

Q and dO are read through the 2-D TMA view of gluon_fwd._tma_rows_view:
a query block that runs past the end of a sequence reads the tokens after
it, which get p = 0 (and add exact zeros to dQ); a NaN or inf there would
leak (0 * inf), which the Triton kernel's masked loads rule out.  K and V
come the same way, by the load warp before the first Q / dO tiles (so
that their latency overlaps those loads'); in the last key block of a
sequence the MMA warps overwrite the rows past its end with zeros before
the first MMA, as the masked loads gave.
"""

from __future__ import annotations

import torch
import triton

from . import gluon_fwd
from .gluon_fwd import _LOG2E, HAVE_GLUON, LOG2E, hopper_tma_ready, tma_descriptors
from .tile_ranges import first_query_blocks, query_tiles, sequence_and_head

if HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from .gluon_fwd import (REC_FIELDS, _next_item, _publish_item, _read_item, cta_barrier, load_barrier,
                            ring_barriers, tma_load, tma_reduce_add)


# (BLOCK_M, BLOCK_N, MMA warps, STAGES) per head dim: two MMA warpgroups
# of 64 keys each share the query blocks' tiles.
CONFIGS = {64: (64, 128, 8, 2), 128: (64, 128, 8, 2)}
# What runs, by head dim, without and with ACP: None (the Triton kernels),
# "dkdv" (this kernel for dK / dV after Triton's dQ kernel) or "fused" (this
# kernel for all three gradients); measured as the module docstring says.
DISPATCH = {64: ("dkdv", "dkdv"), 128: ("fused", "fused")}
# registers a thread at launch (12 warps: one CTA per SM); setmaxnreg then
# gives the MMA warps 240 and the load and write warps 24
MAXNREG = 168
# The persistent kernel (one CTA per SM taking key blocks from a counter)
# instead of one program per key block, at these head dims, where DISPATCH
# runs this kernel without the fused dQ; PERSISTENT_CTAS (tests) caps its
# grid.
PERSISTENT = True
PERSISTENT_HEAD_DIMS = (64,)
PERSISTENT_CTAS = None


def mode(q, k, v, do, acp=False):
    """What the Gluon kernel does for this call (acp: ACP prunes it): None,
    "dkdv" or "fused" as DISPATCH says for its head dim, for bf16 (the
    dtype it has been checked in on a GPU; fp16 runs the Triton kernels)
    tensors that gluon_fwd.hopper_tma_ready takes, all four read by TMA."""
    D = q.shape[-1]
    if q.dtype != torch.bfloat16 or D not in CONFIGS or D not in DISPATCH:
        return None
    what = DISPATCH[D][bool(acp)]
    return what if what is not None and hopper_tma_ready((q, k, v, do), (q, do, k, v)) else None


def takes_boundaries(head_dim, acp_block_m, acp_block_n) -> bool:
    """Whether ACP boundaries found in (acp_block_m, acp_block_n) tiles
    translate to this kernel's: blocks that are whole numbers of theirs."""
    cfg = CONFIGS.get(head_dim)
    return cfg is not None and cfg[1] % acp_block_n == 0 and cfg[0] % acp_block_m == 0


if HAVE_GLUON:

    @gluon.jit
    def _bwd_load_partition(q_desc, do_desc, k_desc, v_desc, q_bufs, do_bufs, k_smem, v_smem, ready, empty, kv_ready,
                            QBHI, s_id, hk, pid_n, qlen, klen, lo, full_lo, q_r0, q_c0, stride_qh, do_r0, do_c0,
                            stride_doh, k_r0, k_c0, v_r0, v_c0, stride_qbhi_s, stride_qbhi_h,
                            GROUP: gl.constexpr, USE_ACP: gl.constexpr, STAGES: gl.constexpr, BLOCK_M: gl.constexpr,
                            BLOCK_N: gl.constexpr, ACP_BLOCK_M: gl.constexpr, ACP_BLOCK_N: gl.constexpr):
        # one warp: TMA loads of the CTA's K and V, then of each query
        # block's Q and dO tiles, head by head, each buffer refilled once the
        # MMA warps have released it
        mbarrier.expect(kv_ready, 2 * k_desc.block_type.nbytes)
        tma_load(k_desc, [k_r0, k_c0], kv_ready, k_smem)
        tma_load(v_desc, [v_r0, v_c0], kv_ready, v_smem)
        nbytes: gl.constexpr = 2 * q_desc.block_type.nbytes
        it = 0
        for g in range(GROUP):
            h = hk * GROUP + g
            _, hi = query_tiles(QBHI, s_id * stride_qbhi_s + h * stride_qbhi_h, pid_n, qlen, klen, full_lo, USE_ACP,
                                BLOCK_M, BLOCK_N, ACP_BLOCK_M, ACP_BLOCK_N)
            for mb in range(lo, hi):
                b = it % STAGES
                mbarrier.wait(empty.index(b), (it // STAGES) & 1)
                mbarrier.expect(ready.index(b), nbytes)
                tma_load(q_desc, [q_r0 + mb * BLOCK_M, q_c0 + h * stride_qh], ready.index(b), q_bufs.index(b))
                tma_load(do_desc, [do_r0 + mb * BLOCK_M, do_c0 + h * stride_doh], ready.index(b), do_bufs.index(b))
                it += 1

    @gluon.jit
    def _bwd_dq_write_partition(dqa_desc, dcq_desc, dq_smem, rs_smem, dq_full, dq_empty, QBHI, s_id, hk, pid_n, qlen,
                                klen, lo, full_lo, dqa_r0, dqa_c0, stride_dqah, dcq_r0, dcq_c0, stride_dcqh,
                                stride_qbhi_s, stride_qbhi_h, GROUP: gl.constexpr,
                                USE_ACP: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                                ACP_BLOCK_M: gl.constexpr, ACP_BLOCK_N: gl.constexpr, FUSED_DQ: gl.constexpr):
        # one warp (fused dQ): each tile's dQ and dc_q row sums, staged by the
        # MMA warps, go out by TMA reduce-adds while those warps go on with
        # the next tile (FlashAttention-3's dQ writer); rows past the
        # sequence's end (the 2-D views' next tokens) get dS = 0 exactly, so
        # they add zeros
        if FUSED_DQ:
            it = 0
            for g in range(GROUP):
                h = hk * GROUP + g
                _, hi = query_tiles(QBHI, s_id * stride_qbhi_s + h * stride_qbhi_h, pid_n, qlen, klen, full_lo,
                                    USE_ACP, BLOCK_M, BLOCK_N, ACP_BLOCK_M, ACP_BLOCK_N)
                for mb in range(lo, hi):
                    mbarrier.wait(dq_full, it & 1)
                    tma_reduce_add(dqa_desc, [dqa_r0 + mb * BLOCK_M, dqa_c0 + h * stride_dqah], dq_smem)
                    tma_reduce_add(dcq_desc, [dcq_r0 + mb * BLOCK_M, dcq_c0 + h * stride_dcqh], rs_smem)
                    # both have been read out of shared memory
                    tma.store_wait(0)
                    mbarrier.arrive(dq_empty, count=1)
                    it += 1

    @gluon.jit
    def _row_terms(cq_base, lse_base, dlt_base, mb, qlen, offs_v, BLOCK_M: gl.constexpr):
        # query block mb's first decay, decays, log-sum-exps and deltas
        # (rows past the end: lse = +inf)
        offs = mb * BLOCK_M + offs_v
        vmask = offs < qlen
        c_ref = gl.load(cq_base + mb * BLOCK_M, mask=mb * BLOCK_M < qlen, other=0.0)
        cq = gl.load(cq_base + offs, mask=vmask, other=0.0)
        lse = gl.load(lse_base + offs, mask=vmask, other=float("inf"))
        dlt = gl.load(dlt_base + offs, mask=vmask, other=0.0)
        return c_ref, cq, lse, dlt

    @gluon.jit
    def _head_terms(CK, CQ, LSE, DLT, row, qrow, q0, k0, h, lo, qlen, offs_n, kmask, offs_v, stride_cqb, stride_cqh,
                    stride_ckb, stride_ckh, stride_lb, stride_lh, BLOCK_M: gl.constexpr):
        # what one head's pass over a key block starts with: the keys'
        # decays and the row terms of its first query block (int64 row,
        # qrow, q0, k0)
        ck = gl.load(CK + row * stride_ckb + h * stride_ckh + k0 + offs_n, mask=kmask, other=0.0)
        cq_base, lse_base, dlt_base = _row_bases(CQ, LSE, DLT, qrow, q0, h, stride_cqb, stride_cqh, stride_lb,
                                                 stride_lh)
        c_ref, cq, lse, dlt = _row_terms(cq_base, lse_base, dlt_base, lo, qlen, offs_v, BLOCK_M)
        return ck, c_ref, cq, lse, dlt

    @gluon.jit
    def _zero_keys_past_end(k_smem, v_smem, pid_n, klen, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
                            num_warps: gl.constexpr):
        # the last key block: its rows past the sequence's end came from
        # the tokens after it; zeros, as masked loads would give (a NaN
        # there would reach dQ through 0 * NaN)
        ROWS_L: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // HEAD_DIM, HEAD_DIM // 8], [num_warps, 1],
                                                [1, 0])
        rows = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, ROWS_L))
        in_seq = (rows < klen)[:, None]
        k_rows = k_smem.load(ROWS_L)
        k_smem.store(gl.where(in_seq, k_rows, gl.zeros_like(k_rows)))
        v_rows = v_smem.load(ROWS_L)
        v_smem.store(gl.where(in_seq, v_rows, gl.zeros_like(v_rows)))
        fence_async_shared()
        cta_barrier()

    @gluon.jit
    def _row_bases(CQ, LSE, DLT, qrow, q0, h, stride_cqb, stride_cqh, stride_lb, stride_lh):
        # one head's query decays, log-sum-exps and deltas (int64 qrow, q0)
        return (CQ + qrow * stride_cqb + h * stride_cqh + q0, LSE + qrow * stride_lb + h * stride_lh + q0,
                DLT + qrow * stride_lb + h * stride_lh + q0)

    @gluon.jit
    def _tile_terms(colp_smem, dlt_smem, tb, ck, c_ref, cq_n, lse_n, dlt_n, cq_base, lse_base, dlt_base, mb, qlen,
                    offs_v, QUERIES: gl.constexpr, BLOCK_M: gl.constexpr):
        # query block mb's row terms (loaded a block ahead), spread over the
        # MMA layout's columns through shared buffer tb (see
        # _bwd_mma_partition; rows past the end have lse = +inf, so p = 0),
        # the next block's loaded, and the keys' decays relative to block
        # mb's first query: (colp, dlt, ck2, the next block's four terms)
        cq_v = (cq_n - c_ref).to(gl.float32)
        colp_smem.index(tb).store((cq_v - lse_n) * _LOG2E)
        dlt_smem.index(tb).store(dlt_n)
        cta_barrier()
        colp = colp_smem.index(tb).load(QUERIES)
        dlt = dlt_smem.index(tb).load(QUERIES)
        c_ref_n, cq_n, lse_n, dlt_n = _row_terms(cq_base, lse_base, dlt_base, mb + 1, qlen, offs_v, BLOCK_M)
        ck2 = (ck - c_ref).to(gl.float32) * _LOG2E
        return colp, dlt, ck2, c_ref_n, cq_n, lse_n, dlt_n

    @gluon.jit
    def _tile_ds(k_smem, v_smem, q_buf, do_buf, dv, s_zero, ck2, colp, dlt, offs_m, offs_n, masked, scale2,
                 OP_L: gl.constexpr):
        # one (key block, query block) tile, its Q and dO in: S^T and P^T,
        # then dP^T and dV += P^T dO issued together; returns dS^T and dV's
        # MMA, still running
        s_tok = warpgroup_mma(k_smem, q_buf.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s_tok,))
        p = gl.exp2(s * scale2 - ck2[:, None] + colp[None, :])
        if masked:
            p = gl.where(offs_m[None, :] >= offs_n[:, None], p, 0.0)
        # dP^T only now: issued beside S^T, its registers made the
        # kernel spill (and slower, on an H200)
        dp_tok = warpgroup_mma(v_smem, do_buf.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        dv_tok = warpgroup_mma(gl.convert_layout(p.to(k_smem.dtype), OP_L), do_buf, dv, is_async=True)
        dp = warpgroup_mma_wait(1, deps=(dp_tok,))
        return p * (dp - dlt[None, :]), dv_tok

    @gluon.jit
    def _bwd_mma_partition(k_smem, v_smem, q_bufs, do_bufs, ds_bufs, dq_smem, rs_smem, ones_smem, colp_smem,
                           dlt_smem, ready, empty, kv_ready, dq_full, dq_empty, CQ, CK, LSE, DLT,
                           QBHI, DCK, DK, DV, s_id, hk, pid_n, row, qrow, q0, k0, qlen, klen, lo, full_lo,
                           stride_cqb, stride_cqh, stride_ckb, stride_ckh, stride_lb, stride_lh, stride_dckb,
                           stride_dckh, stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt, stride_dvh,
                           stride_qbhi_s, stride_qbhi_h, scale, scale2,
                           GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                           BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr, USE_ACP: gl.constexpr,
                           STAGES: gl.constexpr, ACP_BLOCK_M: gl.constexpr, ACP_BLOCK_N: gl.constexpr,
                           FUSED_DQ: gl.constexpr, num_warps: gl.constexpr):
        dtype: gl.constexpr = k_smem.dtype
        # transposed tiles (keys x queries) and the [keys, head dim] gradients
        S_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BLOCK_M, 16])
        G_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, HEAD_DIM, 16])
        OP_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=G_L, k_width=2)
        # dQ = dS K of a query block: [queries, head dim], the head dim split
        # between the two warpgroups (each reads all 128 keys' dS from shared)
        DQ_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, num_warps // 4],
                                                       instr_shape=[16, HEAD_DIM * 4 // num_warps, 16])
        KEYS: gl.constexpr = gl.SliceLayout(1, S_L)
        QUERIES: gl.constexpr = gl.SliceLayout(0, S_L)
        offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=KEYS)
        kmask = offs_n < klen
        offs_mt = gl.arange(0, BLOCK_M, layout=QUERIES)
        # the query blocks' row terms: loaded a block ahead, one value a
        # thread (loaded in the MMA layout's columns, 16 loads a thread each,
        # their latency stalled every tile), then spread over those columns
        # through shared memory: all of a tile's terms behind one barrier, in one
        # of two buffers by tile parity (so that a warp may write the next
        # tile's while another still reads this one's): two barriers a tile,
        # one of them the compiler's (it cannot see the parity).  A
        # convert_layout per term took two barriers each, and ACP's threshold
        # term made the kernel 8% slower at head dim 64 with nothing pruned
        # (acp_probe_8192_h200.json).  Staged, the kernel alone is 1.4-2.0%
        # faster at head dim 64 without ACP and 3.3-4.2% with it, 1.6-2.9%
        # with ACP at head dim 128 (gluon_dkdv_row_terms_smem_h200.json).
        VEC_L: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
        offs_v = gl.arange(0, BLOCK_M, layout=VEC_L)
        dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, layout=G_L)
        dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, layout=G_L)
        s_zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=S_L)
        if FUSED_DQ:
            dq_zero = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=DQ_L)
            # dc_q's row sums of dS: dS [queries, keys] times a [keys, 16]
            # block of ones (the smallest wgmma), its first column kept
            RS_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, num_warps // 4],
                                                           instr_shape=[16, 64 // num_warps, 16])
            rs_zero = gl.zeros([BLOCK_M, 16], gl.float32, layout=RS_L)
        mbarrier.wait(kv_ready, 0)
        if (pid_n + 1) * BLOCK_N > klen:
            _zero_keys_past_end(k_smem, v_smem, pid_n, klen, HEAD_DIM, BLOCK_N, num_warps)
        it = 0
        for g in range(GROUP):
            h = hk * GROUP + g
            # [lo, mid): the diagonal tiles (none without the causal mask)
            mid, hi = query_tiles(QBHI, s_id * stride_qbhi_s + h * stride_qbhi_h, pid_n, qlen, klen, full_lo,
                                  USE_ACP, BLOCK_M, BLOCK_N, ACP_BLOCK_M, ACP_BLOCK_N)
            ck, c_ref_n, cq_n, lse_n, dlt_n = _head_terms(CK, CQ, LSE, DLT, row, qrow, q0, k0, h, lo, qlen, offs_n,
                                                          kmask, offs_v, stride_cqb, stride_cqh, stride_ckb,
                                                          stride_ckh, stride_lb, stride_lh, BLOCK_M)
            cq_base, lse_base, dlt_base = _row_bases(CQ, LSE, DLT, qrow, q0, h, stride_cqb, stride_cqh, stride_lb,
                                                     stride_lh)
            dck = gl.zeros([BLOCK_N], gl.float32, layout=KEYS)
            for mb in range(lo, hi):
                b = it % STAGES
                offs_m = mb * BLOCK_M + offs_mt
                colp, dlt, ck2, c_ref_n, cq_n, lse_n, dlt_n = _tile_terms(
                    colp_smem, dlt_smem, it % 2, ck, c_ref_n, cq_n, lse_n, dlt_n, cq_base, lse_base, dlt_base, mb,
                    qlen, offs_v, QUERIES, BLOCK_M)
                mbarrier.wait(ready.index(b), (it // STAGES) & 1)
                q_buf = q_bufs.index(b)
                do_buf = do_bufs.index(b)
                ds, dv_tok = _tile_ds(k_smem, v_smem, q_buf, do_buf, dv, s_zero, ck2, colp, dlt, offs_m, offs_n,
                                      mb < mid, scale2, OP_L)
                if FUSED_DQ:
                    # dS^T through shared memory (module docstring): both
                    # warpgroups read all of it, hence the barrier, and two
                    # buffers so that one may write the next tile's half
                    # while the other still reads this one
                    ds16 = ds.to(dtype)
                    dck += gl.sum(ds16.to(gl.float32), 1)
                    ds_buf = ds_bufs.index(it % 2)
                    ds_buf.store(ds16)
                    fence_async_shared()
                    cta_barrier()
                    dq_tok = warpgroup_mma(ds_buf.permute((1, 0)), k_smem, dq_zero, use_acc=False, is_async=True)
                    rs_tok = warpgroup_mma(ds_buf.permute((1, 0)), ones_smem, rs_zero, use_acc=False, is_async=True)
                    dk_tok = warpgroup_mma(ds_buf, q_buf, dk, is_async=True)
                    # dQ and the row sums go to shared memory while dK's MMA
                    # runs (issued last: waits count groups in order)
                    dv, dq, rs = warpgroup_mma_wait(1, deps=(dv_tok, dq_tok, rs_tok))
                    # the write warp has sent the last tile's dQ and row sums
                    mbarrier.wait(dq_empty, it & 1)
                    dq_smem.store(dq * scale)
                    rs_smem.store(rs)
                    fence_async_shared()
                    mbarrier.arrive(dq_full, count=1)
                    dk = warpgroup_mma_wait(0, deps=(dk_tok,))
                    mbarrier.arrive(empty.index(b), count=1)
                else:
                    dck += gl.sum(ds, 1)
                    dk_tok = warpgroup_mma(gl.convert_layout(ds.to(dtype), OP_L), q_buf, dk, is_async=True)
                    dv, dk = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok))
                    mbarrier.arrive(empty.index(b), count=1)
                it += 1
            gl.store(DCK + row * stride_dckb + h * stride_dckh + k0 + offs_n, -dck, mask=kmask)
        offs_ng = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, G_L))
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, G_L))
        gmask = (offs_ng < klen)[:, None]
        gl.store(DK + row * stride_dkb + hk * stride_dkh + (k0 + offs_ng)[:, None] * stride_dkt + offs_d[None, :],
                 (dk * scale).to(DK.dtype.element_ty), mask=gmask)
        gl.store(DV + row * stride_dvb + hk * stride_dvh + (k0 + offs_ng)[:, None] * stride_dvt + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=gmask)

    @gluon.jit
    def _dkdv_kernel_sm90(
        q_desc, k_desc, v_desc, do_desc, CQ, CK, LSE, DLT, QBHI, DK, DV, DCK, dqa_desc, dcq_desc,
        ROW, QROW, QSTART, QLEN, KSTART_POS, KLEN, ORDER,
        q_rows_b, q_cols_b, stride_qh,
        k_rows_b, k_cols_b, stride_kh,
        v_rows_b, v_cols_b, stride_vh,
        do_rows_b, do_cols_b, stride_doh,
        stride_dkb, stride_dkt, stride_dkh,
        stride_dvb, stride_dvt, stride_dvh,
        stride_cqb, stride_cqh, stride_ckb, stride_ckh,
        stride_lb, stride_lh,
        stride_dckb, stride_dckh,
        dqa_rows_b, dqa_cols_b, stride_dqah, dcq_rows_b, dcq_cols_b, stride_dcqh,
        stride_qbhi_s, stride_qbhi_h,
        scale, scale2,
        GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
        CAUSAL: gl.constexpr, USE_ACP: gl.constexpr, STAGES: gl.constexpr, ACP_BLOCK_M: gl.constexpr,
        ACP_BLOCK_N: gl.constexpr, FUSED_DQ: gl.constexpr, ORDERED: gl.constexpr, num_warps: gl.constexpr,
    ):
        # warp-specialised: num_warps warps of MMAs (the default partition)
        # and one warp of TMA loads; K / V / Q / dO of (row, token t, head)
        # at (row * rows_b + t, row * cols_b + head * stride_h) of the 2-D
        # descriptors (see launch_dkdv)
        dtype: gl.constexpr = k_desc.block_type.element_ty
        gl.static_assert(BLOCK_N == 16 * num_warps)
        gl.static_assert(BLOCK_M % ACP_BLOCK_M == 0)
        gl.static_assert(BLOCK_N % ACP_BLOCK_N == 0)

        pid_n = gl.program_id(0)
        s_id, hk = sequence_and_head(ORDER, ORDERED)
        klen = gl.load(KLEN + s_id)
        if pid_n * BLOCK_N < klen:
            qlen = gl.load(QLEN + s_id)
            row = gl.load(ROW + s_id).to(gl.int64)
            qrow = gl.load(QROW + s_id)
            q0 = gl.load(QSTART + s_id)
            k0 = gl.load(KSTART_POS + s_id).to(gl.int64)
            # K and V come by TMA from the load warp, beside the first Q / dO
            # tiles (loaded here, their latency came before everything)
            k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], k_desc.layout)
            v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], v_desc.layout)
            kv_ready = load_barrier()
            q_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], q_desc.layout)
            do_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], do_desc.layout)
            if FUSED_DQ:
                ds_bufs = gl.allocate_shared_memory(dtype, [2, BLOCK_N, BLOCK_M],
                                                    gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype))
                dq_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_M, HEAD_DIM], dqa_desc.layout)
                rs_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_M, 16], dcq_desc.layout)
                ONES_L: gl.constexpr = gl.BlockedLayout([1, 8], [32, 1], [num_warps, 1], [1, 0])
                ones_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, 16],
                                                      gl.NVMMASharedLayout.get_default_for([BLOCK_N, 16], dtype),
                                                      gl.full([BLOCK_N, 16], 1.0, dtype, layout=ONES_L))
            else:  # not used
                ds_bufs = q_bufs
                dq_smem = q_bufs
                rs_smem = q_bufs
                ones_smem = q_bufs
            # the row terms' staging buffers (see _bwd_mma_partition), two of
            # each by tile parity
            ROWS_SL: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
            colp_smem = gl.allocate_shared_memory(gl.float32, [2, BLOCK_M], ROWS_SL)
            dlt_smem = gl.allocate_shared_memory(gl.float32, [2, BLOCK_M], ROWS_SL)
            ready, empty = ring_barriers(STAGES)
            # dQ's staging buffers: full (MMA warps -> write warp), empty
            # (back; starts free)
            dq_full, dq_empty = ring_barriers(1)
            dq_full = dq_full.index(0)
            dq_empty = dq_empty.index(0)
            lo, full_lo = first_query_blocks(pid_n, qlen, BLOCK_M, BLOCK_N, CAUSAL)
            # the write warp idles without FUSED_DQ
            gl.warp_specialize(
                [(_bwd_mma_partition, (k_smem, v_smem, q_bufs, do_bufs, ds_bufs, dq_smem, rs_smem, ones_smem,
                                       colp_smem, dlt_smem, ready, empty, kv_ready, dq_full, dq_empty,
                                       CQ, CK, LSE, DLT, QBHI, DCK, DK, DV, s_id, hk, pid_n, row,
                                       qrow.to(gl.int64), q0.to(gl.int64), k0, qlen, klen, lo, full_lo, stride_cqb,
                                       stride_cqh, stride_ckb, stride_ckh, stride_lb, stride_lh, stride_dckb,
                                       stride_dckh, stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt,
                                       stride_dvh, stride_qbhi_s, stride_qbhi_h, scale,
                                       scale2, GROUP, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, USE_ACP, STAGES,
                                       ACP_BLOCK_M, ACP_BLOCK_N, FUSED_DQ, num_warps)),
                 (_bwd_load_partition, (q_desc, do_desc, k_desc, v_desc, q_bufs, do_bufs, k_smem, v_smem, ready, empty,
                                        kv_ready, QBHI, s_id, hk, pid_n, qlen, klen, lo, full_lo,
                                        qrow * q_rows_b + q0, qrow * q_cols_b, stride_qh, qrow * do_rows_b + q0,
                                        qrow * do_cols_b, stride_doh,
                                        (row * k_rows_b + k0 + pid_n * BLOCK_N).to(gl.int32),
                                        (row * k_cols_b + hk * stride_kh).to(gl.int32),
                                        (row * v_rows_b + k0 + pid_n * BLOCK_N).to(gl.int32),
                                        (row * v_cols_b + hk * stride_vh).to(gl.int32), stride_qbhi_s,
                                        stride_qbhi_h, GROUP, USE_ACP, STAGES, BLOCK_M, BLOCK_N,
                                        ACP_BLOCK_M, ACP_BLOCK_N)),
                 (_bwd_dq_write_partition, (dqa_desc, dcq_desc, dq_smem, rs_smem, dq_full, dq_empty, QBHI, s_id, hk,
                                            pid_n, qlen, klen, lo, full_lo, qrow * dqa_rows_b + q0,
                                            qrow * dqa_cols_b, stride_dqah, qrow * dcq_rows_b + q0,
                                            qrow * dcq_cols_b, stride_dcqh, stride_qbhi_s, stride_qbhi_h,
                                            GROUP, USE_ACP, BLOCK_M, BLOCK_N, ACP_BLOCK_M,
                                            ACP_BLOCK_N, FUSED_DQ))],
                [1, 1], [24, 24])

    # ---- the persistent dK / dV kernel ----------------------------------
    # gluon_fwd's persistent forward, for key blocks: one CTA per SM takes
    # (key block, sequence, key / value head) items from a global counter
    # in the per-block grid's launch order (key blocks fastest: under the
    # causal mask the first ones see the most query blocks).  K and V are
    # double-buffered, so that the load warp brings an item's K, V and
    # first Q / dO tiles while the MMA warps finish the item before; the
    # load warp finds each next item once the current one's first tiles are
    # issued and publishes its record in shared memory (gluon_fwd's
    # _publish_item), and the MMA warps read it before the current item's
    # epilogue, issuing the next item's first decay and row-term loads
    # there.  Without the fused dQ only (head dim 64's DISPATCH).

    @gluon.jit
    def _next_dkdv_item(w, P, total, CNT, NUM_N, S, ORDER, QLEN, KLEN, ROW, QROW, QSTART, KSTART_POS,
                        ORDERED: gl.constexpr, CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
        # the first item from w on that holds keys, with its pair-table
        # entries and first query blocks (w >= total: none left)
        w, s_id, hk, pid_n, klen = _next_item(w, P, total, CNT, NUM_N, S, ORDER, KLEN, ORDERED, False, BLOCK_N)
        qlen = gl.load(QLEN + s_id)
        row = gl.load(ROW + s_id)
        qrow = gl.load(QROW + s_id)
        q0 = gl.load(QSTART + s_id)
        k0 = gl.load(KSTART_POS + s_id)
        lo, full_lo = first_query_blocks(pid_n, qlen, BLOCK_M, BLOCK_N, CAUSAL)
        return w, s_id, hk, pid_n, klen, qlen, row, qrow, q0, k0, lo, full_lo

    @gluon.jit
    def _persistent_bwd_load_partition(q_desc, do_desc, k_desc, v_desc, q_bufs, do_bufs, k_bufs, v_bufs, ready,
                                       empty, kv_ready, kv_empty, item_ready, item_empty, items, CNT, QBHI, ROW,
                                       QROW, QSTART, QLEN, KSTART_POS, KLEN, ORDER, NUM_N, S, total,
                                       q_rows_b, q_cols_b, stride_qh, do_rows_b, do_cols_b, stride_doh,
                                       k_rows_b, k_cols_b, stride_kh, v_rows_b, v_cols_b, stride_vh,
                                       stride_qbhi_s, stride_qbhi_h, GROUP: gl.constexpr, USE_ACP: gl.constexpr,
                                       CAUSAL: gl.constexpr, ORDERED: gl.constexpr, STAGES: gl.constexpr,
                                       BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, ACP_BLOCK_M: gl.constexpr,
                                       ACP_BLOCK_N: gl.constexpr):
        # one warp: per item, K and V into buffer t % 2, then the Q / dO
        # tiles as _bwd_load_partition streams them (ring positions and
        # phases run on over the items); the next item is looked up and
        # published once STAGES of them are issued (the loads after those
        # wait for the MMA warps anyway), or after the item if it has fewer
        nbytes: gl.constexpr = 2 * q_desc.block_type.nbytes
        kv_bytes: gl.constexpr = 2 * k_desc.block_type.nbytes
        pid = gl.program_id(0)
        P = gl.num_programs(0)
        w, s_id, hk, pid_n, klen, qlen, row, qrow, q0, k0, lo, full_lo = _next_dkdv_item(
            pid, P, total, CNT, NUM_N, S, ORDER, QLEN, KLEN, ROW, QROW, QSTART, KSTART_POS, ORDERED, CAUSAL, BLOCK_M,
            BLOCK_N)
        _publish_item(items, 0, item_ready, item_empty, w, total, s_id, hk, pid_n, qlen, klen, lo, full_lo, 0, row,
                      qrow, q0, k0)
        t = 0
        it = 0
        while w < total:
            cur_s = s_id
            cur_hk = hk
            cur_n = pid_n
            cur_klen = klen
            cur_qlen = qlen
            cur_lo = lo
            cur_full_lo = full_lo
            q_r0 = qrow * q_rows_b + q0
            q_c0 = qrow * q_cols_b
            do_r0 = qrow * do_rows_b + q0
            do_c0 = qrow * do_cols_b
            kb = t % 2
            mbarrier.wait(kv_empty.index(kb), (t // 2) & 1)
            mbarrier.expect(kv_ready.index(kb), kv_bytes)
            tma_load(k_desc, [row * k_rows_b + k0 + pid_n * BLOCK_N, row * k_cols_b + hk * stride_kh],
                     kv_ready.index(kb), k_bufs.index(kb))
            tma_load(v_desc, [row * v_rows_b + k0 + pid_n * BLOCK_N, row * v_cols_b + hk * stride_vh],
                     kv_ready.index(kb), v_bufs.index(kb))
            it0 = it
            ahead = 0
            for g in range(GROUP):
                h = cur_hk * GROUP + g
                _, hi = query_tiles(QBHI, cur_s * stride_qbhi_s + h * stride_qbhi_h, cur_n, cur_qlen, cur_klen,
                                    cur_full_lo, USE_ACP, BLOCK_M, BLOCK_N, ACP_BLOCK_M, ACP_BLOCK_N)
                for mb in range(cur_lo, hi):
                    if (ahead == 0) & (it - it0 == STAGES):
                        w, s_id, hk, pid_n, klen, qlen, row, qrow, q0, k0, lo, full_lo = _next_dkdv_item(
                            P + gl.atomic_add(CNT, 1), P, total, CNT, NUM_N, S, ORDER, QLEN, KLEN, ROW, QROW,
                            QSTART, KSTART_POS, ORDERED, CAUSAL, BLOCK_M, BLOCK_N)
                        _publish_item(items, t + 1, item_ready, item_empty, w, total, s_id, hk, pid_n, qlen, klen,
                                      lo, full_lo, 0, row, qrow, q0, k0)
                        ahead = 1
                    b = it % STAGES
                    mbarrier.wait(empty.index(b), (it // STAGES) & 1)
                    mbarrier.expect(ready.index(b), nbytes)
                    tma_load(q_desc, [q_r0 + mb * BLOCK_M, q_c0 + h * stride_qh], ready.index(b), q_bufs.index(b))
                    tma_load(do_desc, [do_r0 + mb * BLOCK_M, do_c0 + h * stride_doh], ready.index(b),
                             do_bufs.index(b))
                    it += 1
            if ahead == 0:
                w, s_id, hk, pid_n, klen, qlen, row, qrow, q0, k0, lo, full_lo = _next_dkdv_item(
                    P + gl.atomic_add(CNT, 1), P, total, CNT, NUM_N, S, ORDER, QLEN, KLEN, ROW, QROW, QSTART,
                    KSTART_POS, ORDERED, CAUSAL, BLOCK_M, BLOCK_N)
                _publish_item(items, t + 1, item_ready, item_empty, w, total, s_id, hk, pid_n, qlen, klen, lo,
                              full_lo, 0, row, qrow, q0, k0)
            t += 1

    @gluon.jit
    def _persistent_bwd_mma_partition(k_bufs, v_bufs, q_bufs, do_bufs, colp_smem, dlt_smem, ready, empty, kv_ready,
                                      kv_empty, item_ready, item_empty, items, CQ, CK, LSE, DLT, QBHI, DCK, DK, DV,
                                      stride_cqb, stride_cqh, stride_ckb, stride_ckh, stride_lb, stride_lh,
                                      stride_dckb, stride_dckh, stride_dkb, stride_dkt, stride_dkh, stride_dvb,
                                      stride_dvt, stride_dvh, stride_qbhi_s, stride_qbhi_h, scale, scale2,
                                      GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                                      BLOCK_N: gl.constexpr, USE_ACP: gl.constexpr, STAGES: gl.constexpr,
                                      ACP_BLOCK_M: gl.constexpr, ACP_BLOCK_N: gl.constexpr,
                                      num_warps: gl.constexpr):
        # _bwd_mma_partition (without the fused dQ) over the CTA's items:
        # ring positions (it) and row-term buffers run on over the items
        dtype: gl.constexpr = k_bufs.dtype
        S_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BLOCK_M, 16])
        G_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, HEAD_DIM, 16])
        OP_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=G_L, k_width=2)
        KEYS: gl.constexpr = gl.SliceLayout(1, S_L)
        QUERIES: gl.constexpr = gl.SliceLayout(0, S_L)
        VEC_L: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
        offs_nb = gl.arange(0, BLOCK_N, layout=KEYS)
        offs_mt = gl.arange(0, BLOCK_M, layout=QUERIES)
        offs_v = gl.arange(0, BLOCK_M, layout=VEC_L)
        offs_gb = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, G_L))
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, G_L))
        s_zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=S_L)
        w, s_id, hk, pid_n, qlen, klen, lo, full_lo, _, row, qrow, q0, k0 = _read_item(items, 0, item_ready,
                                                                                       item_empty, num_warps)
        offs_n = pid_n * BLOCK_N + offs_nb
        ck, c_ref_n, cq_n, lse_n, dlt_n = _head_terms(CK, CQ, LSE, DLT, row.to(gl.int64), qrow.to(gl.int64),
                                                      q0.to(gl.int64), k0.to(gl.int64), hk * GROUP, lo, qlen, offs_n,
                                                      offs_n < klen, offs_v, stride_cqb, stride_cqh, stride_ckb,
                                                      stride_ckh, stride_lb, stride_lh, BLOCK_M)
        t = 0
        it = 0
        while w >= 0:
            k_smem = k_bufs.index(t % 2)
            v_smem = v_bufs.index(t % 2)
            row64 = row.to(gl.int64)
            qrow64 = qrow.to(gl.int64)
            q064 = q0.to(gl.int64)
            k064 = k0.to(gl.int64)
            offs_n = pid_n * BLOCK_N + offs_nb
            kmask = offs_n < klen
            dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, layout=G_L)
            dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, layout=G_L)
            mbarrier.wait(kv_ready.index(t % 2), (t // 2) & 1)
            if (pid_n + 1) * BLOCK_N > klen:
                _zero_keys_past_end(k_smem, v_smem, pid_n, klen, HEAD_DIM, BLOCK_N, num_warps)
            for g in range(GROUP):
                h = hk * GROUP + g
                mid, hi = query_tiles(QBHI, s_id * stride_qbhi_s + h * stride_qbhi_h, pid_n, qlen, klen, full_lo,
                                      USE_ACP, BLOCK_M, BLOCK_N, ACP_BLOCK_M, ACP_BLOCK_N)
                # head 0's came before the item (a test of g alone, with
                # GROUP = 1, does not compile in Triton 3.6)
                if GROUP > 1:
                    if g > 0:
                        ck, c_ref_n, cq_n, lse_n, dlt_n = _head_terms(CK, CQ, LSE, DLT, row64, qrow64, q064, k064, h,
                                                                      lo, qlen, offs_n, kmask, offs_v, stride_cqb,
                                                                      stride_cqh, stride_ckb, stride_ckh, stride_lb,
                                                                      stride_lh, BLOCK_M)
                cq_base, lse_base, dlt_base = _row_bases(CQ, LSE, DLT, qrow64, q064, h, stride_cqb, stride_cqh,
                                                         stride_lb, stride_lh)
                dck = gl.zeros([BLOCK_N], gl.float32, layout=KEYS)
                for mb in range(lo, hi):
                    b = it % STAGES
                    offs_m = mb * BLOCK_M + offs_mt
                    colp, dlt, ck2, c_ref_n, cq_n, lse_n, dlt_n = _tile_terms(
                        colp_smem, dlt_smem, it % 2, ck, c_ref_n, cq_n, lse_n, dlt_n, cq_base, lse_base, dlt_base,
                        mb, qlen, offs_v, QUERIES, BLOCK_M)
                    mbarrier.wait(ready.index(b), (it // STAGES) & 1)
                    q_buf = q_bufs.index(b)
                    ds, dv_tok = _tile_ds(k_smem, v_smem, q_buf, do_bufs.index(b), dv, s_zero, ck2, colp, dlt,
                                          offs_m, offs_n, mb < mid, scale2, OP_L)
                    dck += gl.sum(ds, 1)
                    dk_tok = warpgroup_mma(gl.convert_layout(ds.to(dtype), OP_L), q_buf, dk, is_async=True)
                    dv, dk = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok))
                    mbarrier.arrive(empty.index(b), count=1)
                    it += 1
                gl.store(DCK + row64 * stride_dckb + h * stride_dckh + k064 + offs_n, -dck, mask=kmask)
            # no MMA reads this item's K and V any more
            mbarrier.arrive(kv_empty.index(t % 2), count=1)
            # the next item's record and first loads, in flight during this
            # epilogue
            t += 1
            (nw, ns, nhk, npid_n, nqlen, nklen, nlo, nfull_lo, _, nrow, nqrow, nq0,
             nk0) = _read_item(items, t, item_ready, item_empty, num_warps)
            offs_nn = npid_n * BLOCK_N + offs_nb
            ck, c_ref_n, cq_n, lse_n, dlt_n = _head_terms(CK, CQ, LSE, DLT, nrow.to(gl.int64), nqrow.to(gl.int64),
                                                          nq0.to(gl.int64), nk0.to(gl.int64), nhk * GROUP, nlo, nqlen,
                                                          offs_nn, offs_nn < nklen, offs_v, stride_cqb, stride_cqh,
                                                          stride_ckb, stride_ckh, stride_lb, stride_lh, BLOCK_M)
            offs_g = pid_n * BLOCK_N + offs_gb
            gmask = (offs_g < klen)[:, None]
            gl.store(DK + row64 * stride_dkb + hk * stride_dkh + (k064 + offs_g)[:, None] * stride_dkt
                     + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=gmask)
            gl.store(DV + row64 * stride_dvb + hk * stride_dvh + (k064 + offs_g)[:, None] * stride_dvt
                     + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=gmask)
            w = nw
            s_id = ns
            hk = nhk
            pid_n = npid_n
            qlen = nqlen
            klen = nklen
            lo = nlo
            full_lo = nfull_lo
            row = nrow
            qrow = nqrow
            q0 = nq0
            k0 = nk0

    @gluon.jit
    def _dkdv_kernel_sm90_persistent(
        q_desc, k_desc, v_desc, do_desc, CQ, CK, LSE, DLT, QBHI, DK, DV, DCK,
        ROW, QROW, QSTART, QLEN, KSTART_POS, KLEN, ORDER, CNT,
        num_n, num_s, total,
        q_rows_b, q_cols_b, stride_qh,
        k_rows_b, k_cols_b, stride_kh,
        v_rows_b, v_cols_b, stride_vh,
        do_rows_b, do_cols_b, stride_doh,
        stride_dkb, stride_dkt, stride_dkh,
        stride_dvb, stride_dvt, stride_dvh,
        stride_cqb, stride_cqh, stride_ckb, stride_ckh,
        stride_lb, stride_lh,
        stride_dckb, stride_dckh,
        stride_qbhi_s, stride_qbhi_h,
        scale, scale2,
        GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
        CAUSAL: gl.constexpr, USE_ACP: gl.constexpr, STAGES: gl.constexpr, ACP_BLOCK_M: gl.constexpr,
        ACP_BLOCK_N: gl.constexpr, ORDERED: gl.constexpr, num_warps: gl.constexpr,
    ):
        # _dkdv_kernel_sm90's partitions (no fused dQ), persistent: a grid
        # of at most one CTA per SM; CNT (zero at launch) hands out the items
        # after each CTA's first (its program id)
        dtype: gl.constexpr = k_desc.block_type.element_ty
        gl.static_assert(BLOCK_N == 16 * num_warps)
        gl.static_assert(BLOCK_M % ACP_BLOCK_M == 0)
        gl.static_assert(BLOCK_N % ACP_BLOCK_N == 0)
        k_bufs = gl.allocate_shared_memory(dtype, [2, BLOCK_N, HEAD_DIM], k_desc.layout)
        v_bufs = gl.allocate_shared_memory(dtype, [2, BLOCK_N, HEAD_DIM], v_desc.layout)
        q_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], q_desc.layout)
        do_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], do_desc.layout)
        ROWS_SL: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        colp_smem = gl.allocate_shared_memory(gl.float32, [2, BLOCK_M], ROWS_SL)
        dlt_smem = gl.allocate_shared_memory(gl.float32, [2, BLOCK_M], ROWS_SL)
        ready, empty = ring_barriers(STAGES)
        kv_ready, kv_empty = ring_barriers(2)
        item_ready, item_empty = ring_barriers(2)
        items = gl.allocate_shared_memory(gl.int32, [2, REC_FIELDS], ROWS_SL)
        gl.warp_specialize(
            [(_persistent_bwd_mma_partition, (k_bufs, v_bufs, q_bufs, do_bufs, colp_smem, dlt_smem, ready, empty,
                                              kv_ready, kv_empty, item_ready, item_empty, items, CQ, CK, LSE, DLT,
                                              QBHI, DCK, DK, DV, stride_cqb, stride_cqh, stride_ckb, stride_ckh,
                                              stride_lb, stride_lh, stride_dckb, stride_dckh, stride_dkb, stride_dkt,
                                              stride_dkh, stride_dvb, stride_dvt, stride_dvh, stride_qbhi_s,
                                              stride_qbhi_h, scale, scale2, GROUP, HEAD_DIM, BLOCK_M, BLOCK_N,
                                              USE_ACP, STAGES, ACP_BLOCK_M, ACP_BLOCK_N, num_warps)),
             (_persistent_bwd_load_partition, (q_desc, do_desc, k_desc, v_desc, q_bufs, do_bufs, k_bufs, v_bufs,
                                               ready, empty, kv_ready, kv_empty, item_ready, item_empty, items, CNT,
                                               QBHI, ROW, QROW, QSTART, QLEN, KSTART_POS, KLEN, ORDER, num_n, num_s,
                                               total, q_rows_b, q_cols_b, stride_qh, do_rows_b, do_cols_b,
                                               stride_doh, k_rows_b, k_cols_b, stride_kh, v_rows_b, v_cols_b,
                                               stride_vh, stride_qbhi_s, stride_qbhi_h, GROUP, USE_ACP, CAUSAL,
                                               ORDERED, STAGES, BLOCK_M, BLOCK_N, ACP_BLOCK_M, ACP_BLOCK_N))],
            [1], [24])


def launch_dkdv(q, k, v, do, c_q, c_k, lse, dlt, thr, qbhi, dk, dv, dc_k, pairs, scale, causal, group, acp_blocks,
                dq_acc=None):
    """Launch the Gluon dK / dV kernel with triton_ops._backward's arguments
    (``mode`` is not None); acp_blocks: the (BLOCK_M, BLOCK_N) of qbhi's
    tiles (``takes_boundaries`` holds).  dq_acc: (dq [B, Tq, Hq, D] float32,
    dc_q16 [B, Tq, Hq, 16] float32), zeroed: the kernel also adds each
    tile's dQ (scaled) and row sums of dS there (the fused dQ; dc_q16's 16
    columns get the same sums, the smallest MMA being 16 wide), and dlt
    holds the rows' delta already.  The pairs are launched in the table's
    ``order_kv`` when it has one (triton_ops.heavy_first)."""
    D = q.shape[-1]
    BM, BN, warps, stages = CONFIGS[D]
    descs, views = tma_descriptors((q, do), BM)
    kv_descs, kv_views = tma_descriptors((k, v), BN)
    use_acp = thr is not None
    S = pairs.row.numel()
    order, ordered = pairs.launch_order(kv=True)
    grid = (triton.cdiv(max(pairs.max_klen, 1), BN), S, k.shape[2])
    qb = qbhi if use_acp else pairs.row.view(1, 1, -1)
    fused = dq_acc is not None
    if fused:
        dqa, dcq = dq_acc
        # the reduce-adds' 2-D views of dq and dc_q16 (float32, bshd)
        (dqa_desc,), (dqa_view,) = tma_descriptors((dqa,), BM)
        (dcq_desc,), (dcq_view,) = tma_descriptors((dcq,), BM)
    else:  # not read
        dqa_desc, dcq_desc, dqa_view, dcq_view = descs[0], descs[0], views[0], views[0]
        dqa = dcq = q
    tables = (pairs.row, pairs.qrow, pairs.qstart, pairs.qlen, pairs.kstart, pairs.klen, order)
    strides = (views[0][2], views[0][3], q.stride(2),
               kv_views[0][2], kv_views[0][3], k.stride(2),
               kv_views[1][2], kv_views[1][3], v.stride(2),
               views[1][2], views[1][3], do.stride(2),
               dk.stride(0), dk.stride(1), dk.stride(2),
               dv.stride(0), dv.stride(1), dv.stride(2),
               c_q.stride(0), c_q.stride(1), c_k.stride(0), c_k.stride(1),
               lse.stride(0), lse.stride(1),
               dc_k.stride(0), dc_k.stride(1))
    consts = dict(GROUP=group, HEAD_DIM=D, BLOCK_M=BM, BLOCK_N=BN, CAUSAL=causal, USE_ACP=use_acp, STAGES=stages,
                  ACP_BLOCK_M=acp_blocks[0], ACP_BLOCK_N=acp_blocks[1], ORDERED=ordered, num_warps=warps,
                  maxnreg=MAXNREG)
    tensors = (descs[0], kv_descs[0], kv_descs[1], descs[1], c_q, c_k, lse, dlt, qb, dk, dv, dc_k)
    if not fused and PERSISTENT and D in PERSISTENT_HEAD_DIMS:
        ctas, total, counter = gluon_fwd.persistent_grid(grid, q.device, PERSISTENT_CTAS)
        _dkdv_kernel_sm90_persistent[(ctas,)](*tensors, *tables, counter, grid[0], S, total, *strides,
                                              qb.stride(0), qb.stride(1), scale, scale * LOG2E, **consts)
        return
    _dkdv_kernel_sm90[grid](*tensors, dqa_desc, dcq_desc, *tables, *strides,
                            dqa_view[2], dqa_view[3], dqa.stride(2), dcq_view[2], dcq_view[3], dcq.stride(2),
                            qb.stride(0), qb.stride(1), scale, scale * LOG2E, FUSED_DQ=fused, **consts)
