"""Hopper forward kernel in Gluon: warp-specialised, with TMA loads and overlapped MMAs.

Triton's Gluon language (``triton.experimental.gluon``, Triton >= 3.6)
exposes what stock Triton does not produce from a plain loop on Hopper:
warp specialisation, TMA copies tracked by mbarriers, and asynchronous
warpgroup MMAs with explicit waits.  This kernel uses them as
FlashAttention-3 does (Shah et al., 2024):

- one load warp streams K and V tiles by TMA into two rings of STAGES
  shared buffers, one for K and one for V; a "ready" mbarrier per buffer
  says its tile has landed, an "empty" one that the MMA warps are done
  with it (a K buffer once S has been computed from it, a V buffer a tile
  later, once P V has);
- the MMA warps are two warpgroups of 64 query rows each (at head dim
  128, over key tiles of 128: FlashAttention-3's tiles), each a partition
  of its own.  Each issues S_j = Q K_j^T and O += P_{j-1} V_{j-1} as two
  asynchronous wgmma, waits only for the first, and computes tile j's
  softmax while the second still runs (the intra-warpgroup overlap of
  FlashAttention-3, section 3.2); the two take turns issuing their MMAs
  (two mbarriers pass the turn), so that one's softmax runs while the
  other's MMAs do (the inter-warpgroup ping-pong, section 3.1).  As one
  partition of eight MMA warps the kernel made the step 1.5-2.0% slower
  (attention_gluon_fwd_pingpong_h200.json, same outputs bit for bit);
- each key tile's decays are loaded a tile ahead, one value a thread,
  then spread over the MMA layout's columns: loaded in that layout (32
  loads a thread) their latency stalled every tile, and the kernel alone
  was 11-16% slower (gluon_fwd_ck_prefetch_h200.json, from
  benchmarks/kernel_versions.py);
- it launches with 168 registers a thread, one CTA per SM; setmaxnreg
  gives the MMA warps 240 and the load warp 24 (at 40 they spilled).

Everything else follows triton_ops._fwd_kernel: the same pair table, tile
ranges (tile_ranges.key_tiles, called by both), ACP boundaries, relative
decays (t = scale * q.k - (c_j - ref), log2 units) and one-compare masks,
so both kernels give the same result up to float32 summation order.  A
query block visits its tiles in one pass over
[lo, hi); a tile takes the element masks only when it lies in ACP's partial
range [lo, full_lo) or the diagonal range [mid, hi) (a branch per tile:
the pipelined MMAs want one loop).

K and V are read through a 2-D TMA view (rows of the token stride, see
_tma_rows_view), so a tile that runs past the end of a sequence reads the
tokens after it (the next document or batch row; zeros past the tensor).
The masks give them zero weight, so finite values there do not matter;
a NaN or inf value in V there would (0 * inf), which the Triton kernel's
masked loads rule out.  Q is read the same way: a query block past the
end computes rows for the tokens after it, which are not stored, and
each row depends only on its own query.

Measured on an H200 against the Triton forward, in fwd + bwd steps at head
dim 128, before the ping-pong and the decays' prefetch (one partition of
eight MMA warps; benchmarks/results/attention_gluon_fwd_128_h200.json):
3.0% (8k) and 1.6% (16k) faster without ACP, 1.4% / 0.8% with it.  The earlier
configuration, 64 x 64 tiles and two CTAs per SM, made the forward alone
0.5-6% faster but not the step (attention_gluon_fwd_h200.json); key tiles
of 128 were 1.8-1.9x slower at that register budget.  At head dim 64 that
first kernel was slower than the Triton forward; this one, with the same
128 x 128 tiles, makes the 24 x 64 step 0.1-1.5% faster at 8k and 16k,
with and without ACP (attention_gluon_fwd_d64_h200.json, 2 interleaved
rounds), so it runs there too.  Without warp specialisation
(cp.async loads issued by the MMA warps, the overlap alone) every
configuration was slower than the Triton forward.

Runs single-GPU / Ulysses calls on sm_90 at head dims 64 and 128 (``supported``)
while triton_ops.USE_GLUON_FWD is on (the default); context-parallel chunk
calls stay on the Triton kernel.
"""

from __future__ import annotations

import torch
import triton

from .tile_ranges import key_tiles

try:  # Gluon and its Hopper module exist from Triton 3.6 on
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # the TMA load's name: async_load from Triton 3.7 on (the old name raises)
    tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
    # the CTA-wide barrier: gl.barrier from Triton 3.7 on
    cta_barrier = gl.barrier if hasattr(gl, "barrier") else gl.thread_barrier
    if hasattr(tma, "async_atomic_add"):  # Triton >= 3.7
        tma_reduce_add = tma.async_atomic_add
    else:
        from triton._C.libtriton import ir as _ir
        from triton.experimental.gluon.language._core import builtin as _builtin

        @_builtin
        def tma_reduce_add(tensor_desc, coord, src, _semantic=None):
            """TMA reduce-add of a shared tile into global memory: Triton 3.6
            has the operation but no Gluon function for it."""
            coord = _semantic._convert_to_ir_values(coord, require_i64=False)
            _semantic.builder.create_async_tma_reduce(_ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord,
                                                      src.handle)
    HAVE_GLUON = True
except ImportError:  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False

LOG2E = 1.4426950408889634
_LOG2E = gl.constexpr(LOG2E) if HAVE_GLUON else LOG2E

# (BLOCK_M, BLOCK_N, MMA warps, STAGES) per head dim.  Two stages ran as fast
# as three on an H200 (attention_gluon_fwd_128_h200.json); head dim 64 takes
# the same tiles (attention_gluon_fwd_d64_h200.json).
CONFIGS = {64: (128, 128, 8, 2), 128: (128, 128, 8, 2)}
# registers a thread at launch: one CTA per SM
MAXNREG = 168


def supported(q, k, v, out) -> bool:
    """Whether the Gluon forward can run this call: bf16 (the dtype it has
    been checked in on a GPU; fp16 runs the Triton kernel), a head dim in
    CONFIGS and what ``hopper_tma_ready`` asks, Q, K and V being the streamed
    tensors."""
    return (q.dtype == torch.bfloat16 and q.shape[-1] in CONFIGS
            and hopper_tma_ready((q, k, v, out), (q, k, v)))


def hopper_tma_ready(tensors, streamed) -> bool:
    """Whether the Gluon kernels can take these bshd tensors: Hopper (sm_90),
    bf16 / fp16, 16-byte aligned with strides that are multiples of 16
    elements (TMA boxes and Triton's alignment proofs), and a 2-D TMA view
    (``_tma_rows_view``) of each streamed tensor."""
    q = tensors[0]
    if not HAVE_GLUON or not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16):
        return False
    for t in tensors:
        if t.data_ptr() % 16 or any(st % 16 for st in t.stride()[:-1]) or t.stride(-1) != 1:
            return False
    if any(_tma_rows_view(t) is None for t in streamed):
        return False
    return torch.cuda.get_device_capability(q.device)[0] == 9


if HAVE_GLUON:

    @gluon.jit
    def _softmax_tile(s, ck2, offs_k, k_last, ck_min2, m_i, l_i, scale2, masked, USE_ACP: gl.constexpr):
        # one tile's online softmax (triton_ops._fwd_tiles): t is the score
        # without the row's decay, so m_i is a maximum of t
        t = s * scale2 - ck2[None, :]
        if masked:
            keep = offs_k[None, :] <= k_last[:, None]
            if USE_ACP:
                keep = keep & (ck2[None, :] <= ck_min2[:, None])
            t = gl.where(keep, t, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(t, 1))
            # a row with nothing kept yet keeps m = -inf; shift by 0 instead
            m_shift = gl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = gl.maximum(m_i, gl.max(t, 1))
            m_shift = m_new
        p = gl.exp2(t - m_shift[:, None])
        alpha = gl.exp2(m_i - m_shift)
        l_i = l_i * alpha + gl.sum(p, 1)
        return p, alpha, l_i, m_new

    @gluon.jit
    def ring_barriers(STAGES: gl.constexpr, CONSUMERS: gl.constexpr = 1):
        """The (ready, empty) mbarriers of a ring of STAGES shared buffers
        filled by a load warp: every buffer starts free (empty arrived);
        CONSUMERS partitions release each buffer."""
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for t in gl.static_range(STAGES):
            mbarrier.init(ready.index(t), count=1)
            mbarrier.init(empty.index(t), count=CONSUMERS)
            mbarrier.arrive(empty.index(t), count=CONSUMERS)
        fence_async_shared()
        return ready, empty

    @gluon.jit
    def load_barrier():
        """One mbarrier for a single TMA load (count 1, not yet arrived):
        the load warp sets its bytes, the MMA warps wait for phase 0."""
        bar = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
        mbarrier.init(bar.index(0), count=1)
        return bar.index(0)

    # a work item's record, as the schedule warp hands it over: int32 fields
    # (thr_shift's float32 bits in the last)
    # a work item's record, as the schedule warp hands it over: int32 fields
    # (thr_shift's float32 bits in the last)
    REC_ITEM = gl.constexpr(0)
    REC_VALID = gl.constexpr(1)
    REC_PID_M = gl.constexpr(2)
    REC_SEQ = gl.constexpr(3)
    REC_HEAD = gl.constexpr(4)
    REC_LO = gl.constexpr(5)
    REC_FULL_LO = gl.constexpr(6)
    REC_MID = gl.constexpr(7)
    REC_N = gl.constexpr(8)
    REC_QLEN = gl.constexpr(9)
    REC_KLEN = gl.constexpr(10)
    REC_ROW = gl.constexpr(11)
    REC_QROW = gl.constexpr(12)
    REC_QSTART = gl.constexpr(13)
    REC_KSTART = gl.constexpr(14)
    REC_THR = gl.constexpr(15)

    @gluon.jit
    def _item_record(item, num_m, n_seq, QLEN, KLEN, ROW, QROW, QSTART, KSTART_POS, THR, KBLO, stride_thr_s,
                     stride_kblo_s, stride_kblo_h, stride_kblo_r, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                     ACP_BLOCK_M: gl.constexpr, ACP_BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
                     USE_ACP: gl.constexpr):
        # work item -> (sequence, head, query block), in the order a grid of
        # (num_m, n_seq, heads) would launch them: query blocks fastest
        # (causal: the last, longest, first), then sequences, then heads;
        # the block's key tiles (tile_ranges.key_tiles) and the sequence's
        # table entries.  valid: the block lies inside its sequence (the
        # items cover the longest one)
        r = item % num_m
        sh = item // num_m
        s_id = sh % n_seq
        h = sh // n_seq
        qlen = gl.load(QLEN + s_id)
        if CAUSAL:
            pid_m = gl.cdiv(qlen, BLOCK_M) - 1 - r
        else:
            pid_m = r
        valid = (pid_m >= 0) & (pid_m * BLOCK_M < qlen)
        pid_m = gl.maximum(pid_m, 0)
        klen = gl.load(KLEN + s_id)
        lo, full_lo, mid, hi, thr_shift = key_tiles(THR, KBLO, s_id, h, pid_m, qlen, klen, 0.0, stride_thr_s,
                                                    stride_kblo_s, stride_kblo_h, stride_kblo_r, BLOCK_M, BLOCK_N,
                                                    ACP_BLOCK_M, ACP_BLOCK_N, CAUSAL, USE_ACP)
        REC_L: gl.constexpr = gl.BlockedLayout([16], [32], [1], [0])
        f = gl.arange(0, 16, layout=REC_L)
        rec = gl.where(f == REC_ITEM, item, 0)
        rec += gl.where(f == REC_VALID, valid.to(gl.int32), 0)
        rec += gl.where(f == REC_PID_M, pid_m, 0)
        rec += gl.where(f == REC_SEQ, s_id, 0)
        rec += gl.where(f == REC_HEAD, h, 0)
        rec += gl.where(f == REC_LO, lo, 0)
        rec += gl.where(f == REC_FULL_LO, full_lo, 0)
        rec += gl.where(f == REC_MID, mid, 0)
        rec += gl.where(f == REC_N, hi - lo, 0)
        rec += gl.where(f == REC_QLEN, qlen, 0)
        rec += gl.where(f == REC_KLEN, klen, 0)
        rec += gl.where(f == REC_ROW, gl.load(ROW + s_id), 0)
        rec += gl.where(f == REC_QROW, gl.load(QROW + s_id), 0)
        rec += gl.where(f == REC_QSTART, gl.load(QSTART + s_id), 0)
        rec += gl.where(f == REC_KSTART, gl.load(KSTART_POS + s_id), 0)
        rec += gl.where(f == REC_THR, (thr_shift + 0.0).to(gl.int32, bitcast=True), 0)
        return rec

    @gluon.jit
    def _fwd_schedule_partition(rec_smem, rec_ready, rec_empty, need_next, SCHED, n_items, num_m, n_seq, QLEN, KLEN, ROW, QROW,
                                QSTART, KSTART_POS, THR, KBLO, stride_thr_s, stride_kblo_s, stride_kblo_h,
                                stride_kblo_r, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                                ACP_BLOCK_M: gl.constexpr, ACP_BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
                                USE_ACP: gl.constexpr):
        # one warp: takes work items from the launch's counter SCHED (a
        # dynamic schedule, as FlashAttention-3's persistent kernels: the
        # items keep the grid's longest-first order), looks up each one's
        # tables and hands the record to the load and MMA warps through a
        # ring of two slots.  It takes the next item once the load warp has
        # issued the last loads of the one before (need_next), a few tiles
        # before the MMA warps are done with it: early enough for the chain
        # of dependent loads behind a record, late enough that a CTA does
        # not hold items that another CTA, free sooner, could take (taken
        # a record ahead, the step at head dim 64 without ACP was 2.4% slower
        # than one CTA per query block; the load warp taking them, 4.1%
        # faster)
        j = 0
        item = gl.atomic_add(SCHED, 1)
        while item < n_items:
            rec = _item_record(item, num_m, n_seq, QLEN, KLEN, ROW, QROW, QSTART, KSTART_POS, THR, KBLO,
                               stride_thr_s, stride_kblo_s, stride_kblo_h, stride_kblo_r, BLOCK_M, BLOCK_N,
                               ACP_BLOCK_M, ACP_BLOCK_N, CAUSAL, USE_ACP)
            _publish_record(rec_smem, rec_ready, rec_empty, j, rec)
            mbarrier.wait(need_next, j & 1)
            j += 1
            item = gl.atomic_add(SCHED, 1)
        # the end: a record whose item is past the last
        f = gl.arange(0, 16, layout=gl.BlockedLayout([16], [32], [1], [0]))
        _publish_record(rec_smem, rec_ready, rec_empty, j, gl.where(f == REC_ITEM, item, 0))
        # every CTA takes exactly one item past the end, so the last of
        # those takes sets the counter back to 0 for the next launch
        if item == n_items + gl.num_programs(0) - 1:
            gl.atomic_xchg(SCHED, 0)

    @gluon.jit
    def _publish_record(rec_smem, rec_ready, rec_empty, j, rec):
        slot = j % 2
        mbarrier.wait(rec_empty.index(slot), (j // 2) & 1)
        rec_smem.index(slot).store(rec)
        cta_barrier()
        mbarrier.arrive(rec_ready.index(slot), count=1)

    @gluon.jit
    def _take_record(rec_smem, rec_ready, rec_empty, j, num_warps: gl.constexpr):
        # a partition reads its j-th item's record (every warp of it, before
        # the slot is released); every thread holds all of it
        slot = j % 2
        mbarrier.wait(rec_ready.index(slot), (j // 2) & 1)
        rec = rec_smem.index(slot).load(gl.BlockedLayout([16], [32], [num_warps], [0]))
        cta_barrier()
        mbarrier.arrive(rec_empty.index(slot), count=1)
        return rec

    @gluon.jit
    def _field(rec, f: gl.constexpr):
        # one field of a record (every thread holds the whole record)
        idx = gl.arange(0, 16, layout=rec.type.layout)
        return gl.max(gl.where(idx == f, rec, -2147483647), 0)

    @gluon.jit
    def _fwd_load_partition(q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_ready, q_empty, k_ready, k_empty,
                            v_ready, v_empty, rec_smem, rec_ready, rec_empty, need_next, n_items, q_rows_b, q_cols_b,
                            stride_qh,
                            k_rows_b, k_cols_b, stride_kh, v_rows_b, v_cols_b, stride_vh, GROUP: gl.constexpr,
                            STAGES: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
        # one warp: per work item, the query block (once its buffer is
        # free), then K and V tiles in rings of their own that run on from
        # item to item, in the order the MMA warps use them (K_0, then K_i
        # beside V_{i-1}): a K buffer is free once S has been computed from
        # it, a V buffer only once P V has, a tile later.  So the next
        # item's first tiles load while the MMA warps finish this one.
        k_bytes: gl.constexpr = k_desc.block_type.nbytes
        v_bytes: gl.constexpr = v_desc.block_type.nbytes
        kt = 0  # K (and V) tiles loaded so far
        qc = 0  # query blocks loaded so far
        j = 0  # items taken so far
        rec = _take_record(rec_smem, rec_ready, rec_empty, j, 1)
        while _field(rec, REC_ITEM) < n_items:
            n = _field(rec, REC_N)
            if (_field(rec, REC_VALID) != 0) & (n > 0):
                lo = _field(rec, REC_LO)
                h = _field(rec, REC_HEAD)
                row = _field(rec, REC_ROW)
                qrow = _field(rec, REC_QROW).to(gl.int64)
                q0 = _field(rec, REC_QSTART).to(gl.int64)
                k0 = _field(rec, REC_KSTART)
                hk = h // GROUP
                k_r0 = row * k_rows_b + k0
                k_c0 = row * k_cols_b + hk * stride_kh
                v_r0 = row * v_rows_b + k0
                v_c0 = row * v_cols_b + hk * stride_vh
                mbarrier.wait(q_empty, qc & 1)
                mbarrier.expect(q_ready, q_desc.block_type.nbytes)
                tma_load(q_desc, [(qrow * q_rows_b + q0 + _field(rec, REC_PID_M) * BLOCK_M).to(gl.int32),
                                  (qrow * q_cols_b + h * stride_qh).to(gl.int32)], q_ready, q_smem)
                for i in range(n + 1):
                    if i < n:
                        t = kt + i
                        b = t % STAGES
                        mbarrier.wait(k_empty.index(b), (t // STAGES) & 1)
                        mbarrier.expect(k_ready.index(b), k_bytes)
                        tma_load(k_desc, [k_r0 + (lo + i) * BLOCK_N, k_c0], k_ready.index(b), k_bufs.index(b))
                    if i > 0:
                        t = kt + i - 1
                        b = t % STAGES
                        mbarrier.wait(v_empty.index(b), (t // STAGES) & 1)
                        mbarrier.expect(v_ready.index(b), v_bytes)
                        tma_load(v_desc, [v_r0 + (lo + i - 1) * BLOCK_N, v_c0], v_ready.index(b), v_bufs.index(b))
                kt += n
                qc += 1
            # all of this item's loads are issued: the schedule warp may take the next
            mbarrier.arrive(need_next, count=1)
            j += 1
            rec = _take_record(rec_smem, rec_ready, rec_empty, j, 1)

    @gluon.jit
    def _tile_decays(ck_base, kb, offs_c, klen, BLOCK_N: gl.constexpr):
        # key tile kb's decays in offs_c's layout (keys past the end: 0)
        return gl.load(ck_base + kb * BLOCK_N + offs_c, mask=kb * BLOCK_N + offs_c < klen, other=0.0)

    @gluon.jit
    def _pingpong_item(WG: gl.constexpr, q_smem, k_bufs, v_bufs, q_ready, q_empty, k_ready, k_empty, v_ready,
                       v_empty, turns, kt, tc, qc, cq_base, ck_base, c_ref, thr2, pid_m, qlen, klen, lo, full_lo,
                       mid, n, scale2, o_base, stride_ot, lse_base, USE_ACP: gl.constexpr, CAUSAL: gl.constexpr,
                       STAGES: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                       HEAD_DIM: gl.constexpr, num_warps: gl.constexpr):
        # one warpgroup's rows [WG * BLOCK_M, (WG + 1) * BLOCK_M) of one
        # query block, against the same key tiles as the other warpgroup.
        # The two take turns to issue their MMAs (FlashAttention-3's
        # ping-pong, section 3.1): while one computes a tile's softmax the
        # other's MMAs run.  Each issues n + 1 times: S_0, then S_i with
        # P_{i-1} V_{i-1}, then P_{n-1} V_{n-1}.  kt, tc, qc: the K / V
        # tiles, turns and query blocks of the items before (the rings',
        # turns' and query buffer's phases run on from item to item)
        dtype: gl.constexpr = q_smem.dtype
        S_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BLOCK_N, 16])
        O_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, HEAD_DIM, 16])
        P_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_L, k_width=2)
        ROW_S: gl.constexpr = gl.SliceLayout(1, S_L)
        ROW_O: gl.constexpr = gl.SliceLayout(1, O_L)
        q_rows = q_smem.slice(WG * BLOCK_M, BLOCK_M)
        my_turn = turns.index(WG)
        their_turn = turns.index(1 - WG)
        offs_m = pid_m * (2 * BLOCK_M) + WG * BLOCK_M + gl.arange(0, BLOCK_M, layout=ROW_S)
        qmask = offs_m < qlen
        cq2 = (gl.load(cq_base + offs_m, mask=qmask, other=0.0) - c_ref).to(gl.float32) * _LOG2E
        if USE_ACP:
            ck_min2 = cq2 - thr2
        else:
            ck_min2 = cq2
        if CAUSAL:
            k_last = gl.minimum(offs_m, klen - 1)
        else:
            k_last = gl.zeros_like(offs_m) + (klen - 1)
        offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, S_L))
        # the key tiles' decays: one value a thread, loaded a tile ahead
        # (the columns' layout would take 32 loads a thread, and their
        # latency stalled the tile loop), then spread over the columns
        CK_L: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
        offs_c = gl.arange(0, BLOCK_N, layout=CK_L)
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=ROW_S)
        l_i = gl.zeros([BLOCK_M], gl.float32, layout=ROW_S)
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=O_L)
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=S_L)
        if n > 0:
            offs_k = lo * BLOCK_N + offs_n
            ck_next = _tile_decays(ck_base, lo, offs_c, klen, BLOCK_N)
            ck2 = (gl.convert_layout(ck_next, gl.SliceLayout(0, S_L)) - c_ref).to(gl.float32) * _LOG2E
            ck_next = _tile_decays(ck_base, lo + 1, offs_c, klen, BLOCK_N)
            b0 = kt % STAGES
            mbarrier.wait(q_ready, qc & 1)
            mbarrier.wait(k_ready.index(b0), (kt // STAGES) & 1)
            mbarrier.wait(my_turn, tc & 1)
            s_tok = warpgroup_mma(q_rows, k_bufs.index(b0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            mbarrier.arrive(their_turn, count=1)
            s = warpgroup_mma_wait(0, deps=(s_tok,))
            mbarrier.arrive(k_empty.index(b0), count=1)
            masked = (lo < full_lo) | (lo >= mid)
            p, alpha, l_i, m_i = _softmax_tile(s, ck2, offs_k, k_last, ck_min2, m_i, l_i, scale2, masked, USE_ACP)
            p_op = gl.convert_layout(p.to(dtype), P_L)
            for i in range(1, n):
                kb = lo + i
                t = kt + i
                b = t % STAGES
                pb = (t - 1) % STAGES
                offs_k = kb * BLOCK_N + offs_n
                ck2 = (gl.convert_layout(ck_next, gl.SliceLayout(0, S_L)) - c_ref).to(gl.float32) * _LOG2E
                ck_next = _tile_decays(ck_base, kb + 1, offs_c, klen, BLOCK_N)
                mbarrier.wait(k_ready.index(b), (t // STAGES) & 1)
                mbarrier.wait(v_ready.index(pb), ((t - 1) // STAGES) & 1)
                mbarrier.wait(my_turn, (tc + i) & 1)
                s_tok = warpgroup_mma(q_rows, k_bufs.index(b).permute((1, 0)), s_zero, use_acc=False, is_async=True)
                o_tok = warpgroup_mma(p_op, v_bufs.index(pb), acc, is_async=True)
                mbarrier.arrive(their_turn, count=1)
                s = warpgroup_mma_wait(1, deps=(s_tok,))
                mbarrier.arrive(k_empty.index(b), count=1)
                masked = (kb < full_lo) | (kb >= mid)
                p, alpha, l_i, m_i = _softmax_tile(s, ck2, offs_k, k_last, ck_min2, m_i, l_i, scale2, masked,
                                                   USE_ACP)
                acc = warpgroup_mma_wait(0, deps=(o_tok,))
                mbarrier.arrive(v_empty.index(pb), count=1)
                acc = acc * gl.convert_layout(alpha, ROW_O)[:, None]
                p_op = gl.convert_layout(p.to(dtype), P_L)
            # the query block has done its last S: its buffer may take the next
            mbarrier.arrive(q_empty, count=1)
            t = kt + n - 1
            mbarrier.wait(v_ready.index(t % STAGES), (t // STAGES) & 1)
            mbarrier.wait(my_turn, (tc + n) & 1)
            o_tok = warpgroup_mma(p_op, v_bufs.index(t % STAGES), acc, is_async=True)
            mbarrier.arrive(their_turn, count=1)
            acc = warpgroup_mma_wait(0, deps=(o_tok,))
            mbarrier.arrive(v_empty.index(t % STAGES), count=1)
        empty_row = l_i == 0.0
        l_safe = gl.where(empty_row, 1.0, l_i)
        lse = gl.where(empty_row, float("-inf"), ((m_i + cq2) + gl.log2(l_safe)) * 0.6931471805599453)
        out = acc / gl.convert_layout(l_safe, ROW_O)[:, None]
        offs_mo = pid_m * (2 * BLOCK_M) + WG * BLOCK_M + gl.arange(0, BLOCK_M, layout=ROW_O)
        offs_do = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, O_L))
        gl.store(o_base + offs_mo[:, None] * stride_ot + offs_do[None, :], out.to(dtype),
                 mask=(offs_mo < qlen)[:, None])
        gl.store(lse_base + offs_m, lse, mask=qmask)

    @gluon.jit
    def _pingpong_mma_partition(WG: gl.constexpr, q_smem, k_bufs, v_bufs, q_ready, q_empty, k_ready, k_empty,
                                v_ready, v_empty, turns, rec_smem, rec_ready, rec_empty, n_items, CQ, CK, O, LSE,
                                stride_ob, stride_ot, stride_oh, stride_cqb, stride_cqh, stride_ckb, stride_ckh,
                                stride_lb, stride_lh, scale2, USE_ACP: gl.constexpr, CAUSAL: gl.constexpr,
                                STAGES: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                                HEAD_DIM: gl.constexpr, num_warps: gl.constexpr):
        # one warpgroup (BLOCK_M // 2 rows of each query block) over the
        # items the schedule warp hands over, until one past the end
        kt = 0
        tc = 0
        qc = 0
        j = 0
        rec = _take_record(rec_smem, rec_ready, rec_empty, j, num_warps)
        while _field(rec, REC_ITEM) < n_items:
            if _field(rec, REC_VALID) != 0:
                h = _field(rec, REC_HEAD)
                pid_m = _field(rec, REC_PID_M)
                n = _field(rec, REC_N)
                row = _field(rec, REC_ROW).to(gl.int64)
                qrow = _field(rec, REC_QROW).to(gl.int64)
                q0 = _field(rec, REC_QSTART).to(gl.int64)
                k0 = _field(rec, REC_KSTART)
                cq_base = CQ + qrow * stride_cqb + h * stride_cqh + q0
                c_ref = gl.load(cq_base + pid_m * BLOCK_M)
                ck_base = CK + row * stride_ckb + h * stride_ckh + k0
                o_base = O + qrow * stride_ob + h * stride_oh + q0 * stride_ot
                lse_base = LSE + qrow * stride_lb + h * stride_lh + q0
                thr2 = -(_field(rec, REC_THR).to(gl.float32, bitcast=True))
                _pingpong_item(WG, q_smem, k_bufs, v_bufs, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty,
                               turns, kt, tc, qc, cq_base, ck_base, c_ref, thr2, pid_m, _field(rec, REC_QLEN),
                               _field(rec, REC_KLEN), _field(rec, REC_LO), _field(rec, REC_FULL_LO),
                               _field(rec, REC_MID), n, scale2, o_base, stride_ot, lse_base, USE_ACP, CAUSAL,
                               STAGES, BLOCK_M // 2, BLOCK_N, HEAD_DIM, num_warps)
                if n > 0:
                    kt += n
                    tc += n + 1
                    qc += 1
            j += 1
            rec = _take_record(rec_smem, rec_ready, rec_empty, j, num_warps)

    @gluon.jit
    def _fwd_kernel_sm90_pingpong(
        q_desc, k_desc, v_desc, CQ, CK, O, LSE, THR, KBLO, SCHED,
        ROW, QROW, QSTART, QLEN, KSTART_POS, KLEN,
        q_rows_b, q_cols_b, stride_qh,
        k_rows_b, k_cols_b, stride_kh, v_rows_b, v_cols_b, stride_vh,
        stride_ob, stride_ot, stride_oh,
        stride_cqb, stride_cqh, stride_ckb, stride_ckh,
        stride_lb, stride_lh,
        stride_thr_s, stride_kblo_s, stride_kblo_h, stride_kblo_r,
        scale2, num_m, n_seq, n_items,
        GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
        CAUSAL: gl.constexpr, USE_ACP: gl.constexpr, STAGES: gl.constexpr,
        ACP_BLOCK_M: gl.constexpr, ACP_BLOCK_N: gl.constexpr, num_warps: gl.constexpr,
    ):
        # persistent: one CTA per SM works through the n_items query blocks
        # (num_m a sequence, n_seq sequences, then heads) that its schedule
        # warp takes from the counter SCHED (zero at launch, zero again at
        # exit).  The query block's two warpgroups are separate partitions
        # that take turns on the tensor cores: the default partition
        # (num_warps = 4) and a worker of 4 warps each own BLOCK_M / 2 rows;
        # one load warp feeds both (each buffer is released by both
        # warpgroups), the query block by TMA like K and V (Q of (row, token
        # t, head) at (row * q_rows_b + t, row * q_cols_b + head *
        # stride_qh)).  Launched one CTA per query block instead, a CTA's
        # fixed costs (its start, the chain of table loads before its first
        # TMA, the first tiles' latency, the output's stores) ran beside no
        # tensor-core work, and ACP's shorter rows made them a larger part
        # of the time.
        dtype: gl.constexpr = q_desc.block_type.element_ty
        HALF: gl.constexpr = BLOCK_M // 2
        gl.static_assert(HALF == 16 * num_warps)
        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_desc.layout)
        q_ready, q_empty = ring_barriers(1, 2)
        q_ready = q_ready.index(0)
        q_empty = q_empty.index(0)
        k_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
        v_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
        k_ready, k_empty = ring_barriers(STAGES, 2)
        v_ready, v_empty = ring_barriers(STAGES, 2)
        # the items' records, from the schedule warp to the load warp and
        # the two MMA warpgroups: two slots
        rec_smem = gl.allocate_shared_memory(gl.int32, [2, 16], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        rec_ready, rec_empty = ring_barriers(2, 3)
        need_next = load_barrier()
        # whose turn it is to issue MMAs: warpgroup 0 first
        turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(turns.index(0), count=1)
        mbarrier.init(turns.index(1), count=1)
        mbarrier.arrive(turns.index(0), count=1)
        fence_async_shared()
        gl.warp_specialize(
            [(_pingpong_mma_partition, (0, q_smem, k_bufs, v_bufs, q_ready, q_empty, k_ready, k_empty, v_ready,
                                        v_empty, turns, rec_smem, rec_ready, rec_empty, n_items, CQ, CK, O, LSE,
                                        stride_ob, stride_ot, stride_oh, stride_cqb, stride_cqh, stride_ckb,
                                        stride_ckh, stride_lb, stride_lh, scale2, USE_ACP, CAUSAL, STAGES, BLOCK_M,
                                        BLOCK_N, HEAD_DIM, num_warps)),
             (_pingpong_mma_partition, (1, q_smem, k_bufs, v_bufs, q_ready, q_empty, k_ready, k_empty, v_ready,
                                        v_empty, turns, rec_smem, rec_ready, rec_empty, n_items, CQ, CK, O, LSE,
                                        stride_ob, stride_ot, stride_oh, stride_cqb, stride_cqh, stride_ckb,
                                        stride_ckh, stride_lb, stride_lh, scale2, USE_ACP, CAUSAL, STAGES, BLOCK_M,
                                        BLOCK_N, HEAD_DIM, 4)),
             (_fwd_load_partition, (q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_ready, q_empty, k_ready,
                                    k_empty, v_ready, v_empty, rec_smem, rec_ready, rec_empty, need_next, n_items, q_rows_b,
                                    q_cols_b, stride_qh, k_rows_b, k_cols_b, stride_kh, v_rows_b, v_cols_b,
                                    stride_vh, GROUP, STAGES, BLOCK_M, BLOCK_N)),
             (_fwd_schedule_partition, (rec_smem, rec_ready, rec_empty, need_next, SCHED, n_items, num_m, n_seq, QLEN, KLEN,
                                        ROW, QROW, QSTART, KSTART_POS, THR, KBLO, stride_thr_s, stride_kblo_s,
                                        stride_kblo_h, stride_kblo_r, BLOCK_M, BLOCK_N, ACP_BLOCK_M, ACP_BLOCK_N,
                                        CAUSAL, USE_ACP))],
            [4, 1, 1], [240, 24, 24])


def _tma_rows_view(t):
    """A 2-D TMA descriptor view of a [B, T, H, D] tensor (unit last stride):
    rows of stride_t elements.  Returns (rows, cols, rows_per_batch,
    cols_per_batch) such that (b, t, h) starts at row b * rows_per_batch + t,
    column b * cols_per_batch + h * stride_h; None if the batch stride is
    neither a multiple of the token stride nor inside one token row."""
    B, T, H, D = t.shape
    sb, st, sh, _ = t.stride()
    if B == 1 or sb % st == 0:
        rpb = sb // st if B > 1 else 0
        return (B - 1) * rpb + T, st, rpb, 0
    if (B - 1) * sb + (H - 1) * sh + D <= st:
        return T, st, 0, sb
    return None


def tma_descriptors(tensors, block_rows):
    """2-D TMA descriptors of bshd tensors through their ``_tma_rows_view``
    (boxes of block_rows x head dim), and the views."""
    D = tensors[0].shape[-1]
    dtype = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32}[tensors[0].dtype]
    layout = gl.NVMMASharedLayout.get_default_for([block_rows, D], dtype)
    views = [_tma_rows_view(t) for t in tensors]
    descs = [TensorDescriptor(t, [rows, cols], [cols, 1], [block_rows, D], layout)
             for t, (rows, cols, _, _) in zip(tensors, views)]
    return descs, views


def sm_count(device) -> int:
    """The device's streaming multiprocessors (a persistent grid's size)."""
    index = torch.device(device).index
    if index is None:
        index = torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


_SM_COUNT = {}
_SCHEDULE_COUNTERS = {}


def schedule_counter(device):
    """The persistent kernels' work counter on this device and stream: one
    int32, zero between launches (the kernel that took the last item puts it
    back), so that it is zeroed once, not once a call; a stream of its own
    keeps launches on different streams from sharing one."""
    device = torch.device(device)
    key = (device.index, torch.cuda.current_stream(device).stream_id)
    counter = _SCHEDULE_COUNTERS.get(key)
    if counter is None:
        counter = _SCHEDULE_COUNTERS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return counter


def launch_fwd(q, k, v, c_q, c_k, out, lse, thr, kblo, pairs, scale, causal, group, acp_blocks):
    """Launch the Gluon forward with triton_ops._forward's arguments (no
    partial result to merge into; ``supported`` holds); acp_blocks: the
    (BLOCK_M, BLOCK_N) of kblo's tiles."""
    D = q.shape[-1]
    BM, BN, warps, stages = CONFIGS[D]
    descs, kv = tma_descriptors((k, v), BN)
    use_acp = thr is not None
    S = pairs.row.numel()
    num_m = triton.cdiv(max(pairs.max_qlen, 1), BM)
    n_items = num_m * S * q.shape[2]
    grid = (max(1, min(n_items, sm_count(q.device))),)
    dummy_f = thr if use_acp else c_q
    dummy_i = kblo if use_acp else pairs.row.view(1, 1, 1, -1)
    assert warps == 8, "the ping-pong kernel runs two partitions of 4 MMA warps"
    (q_desc,), (q_view,) = tma_descriptors((q,), BM)
    _fwd_kernel_sm90_pingpong[grid](
        q_desc, descs[0], descs[1], c_q, c_k, out, lse, dummy_f, dummy_i, schedule_counter(q.device),
        pairs.row, pairs.qrow, pairs.qstart, pairs.qlen, pairs.kstart, pairs.klen,
        q_view[2], q_view[3], q.stride(2),
        kv[0][2], kv[0][3], k.stride(2), kv[1][2], kv[1][3], v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        c_q.stride(0), c_q.stride(1), c_k.stride(0), c_k.stride(1),
        lse.stride(0), lse.stride(1),
        dummy_f.stride(0), dummy_i.stride(0), dummy_i.stride(1), dummy_i.stride(2),
        scale * LOG2E, num_m, S, n_items,
        GROUP=group, HEAD_DIM=D, BLOCK_M=BM, BLOCK_N=BN, CAUSAL=causal, USE_ACP=use_acp, STAGES=stages,
        ACP_BLOCK_M=acp_blocks[0], ACP_BLOCK_N=acp_blocks[1], num_warps=4, maxnreg=MAXNREG,
    )
