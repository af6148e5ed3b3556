"""Hopper forward kernel in Gluon: the next tile's QK^T overlaps this tile's softmax.

Triton's Gluon language (``triton.experimental.gluon``, Triton >= 3.6)
exposes Hopper's asynchronous warpgroup MMAs with explicit waits.  That
allows the intra-warpgroup overlap of FlashAttention-3 (Shah et al., 2024,
section 3.2): in each iteration the kernel issues S_j = Q K_j^T and
O += P_{j-1} V_{j-1} as two asynchronous MMAs, waits only for the first,
and computes tile j's softmax while the second still runs on the tensor
cores.  Stock Triton waits for every wgmma right after issuing it
(triton_ops.py's loops compile that way), so exponentials and MMAs take
turns there.

Everything else follows triton_ops._fwd_kernel: the same pair table, tile
ranges, ACP boundaries, relative decays (t = scale * q.k - (c_j - ref),
log2 units) and one-compare masks, so both kernels give the same result up
to float32 summation order.  The tiles of a query block are visited in one
pass over [lo, hi); a tile takes the element masks only when it lies in
ACP's partial range [lo, full_lo) or the diagonal range [mid, hi) (a
branch per tile: the pipelined MMAs need one loop).  K and V tiles arrive by
cp.async into a ring of STAGES shared buffers, STAGES - 2 tiles ahead (a
buffer is free once the P V product of its tile has been waited for, one
iteration after its K was read).

Used for the single-GPU / Ulysses forward on sm_90 (see ``supported``);
context-parallel calls that merge into a partial result
(``ACCUMULATE``) stay on the Triton kernel.
"""

from __future__ import annotations

import torch
import triton

try:  # Gluon and its Hopper module exist from Triton 3.6 on
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    HAVE_GLUON = True
except ImportError:  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False

LOG2E = 1.4426950408889634
_LOG2E = gl.constexpr(LOG2E) if HAVE_GLUON else LOG2E

# (BLOCK_M, BLOCK_N, num_warps, STAGES) per head dim.  8 warps: two
# warpgroups, 64 query rows each.
GLUON_FWD_CONFIGS = {64: (128, 64, 8, 4), 128: (128, 64, 8, 4)}
OVERLAP = True


def supported(q, k, v, out) -> bool:
    """Whether the Gluon forward can run this call: Hopper (sm_90), bf16 /
    fp16 inputs, head dim 64 or 128, 16-byte aligned tensors and token / head
    strides that are multiples of 16 (cp.async copies 16 bytes at a time,
    and Triton proves the alignment from arguments divisible by 16)."""
    if not HAVE_GLUON or not q.is_cuda:
        return False
    if q.dtype not in (torch.bfloat16, torch.float16) or q.shape[-1] not in GLUON_FWD_CONFIGS:
        return False
    for t in (q, k, v, out):
        if t.data_ptr() % 16 or any(st % 16 for st in t.stride()[:-1]) or t.stride(-1) != 1:
            return False
    return torch.cuda.get_device_capability(q.device)[0] == 9


if HAVE_GLUON:

    @gluon.jit
    def _load_kv(k_smem, v_smem, k_base, v_base, stride_kt, stride_vt, kb, valid, klen,
                 BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, LOAD: gl.constexpr):
        # one tile of K and of V into shared memory, 16 bytes per thread
        # and copy; rows past the sequence (or a tile past the range) are
        # zero-filled and never read as keys (the masks drop them)
        rows = kb * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LOAD))
        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, LOAD))
        m = ((rows < klen) & valid)[:, None]
        async_copy.async_copy_global_to_shared(k_smem, k_base + rows[:, None] * stride_kt + cols[None, :], mask=m)
        async_copy.async_copy_global_to_shared(v_smem, v_base + rows[:, None] * stride_vt + cols[None, :], mask=m)
        async_copy.commit_group()

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
    def _fwd_kernel_sm90(
        Q, K, V, CQ, CK, O, LSE, THR, KBLO,
        ROW, QROW, QSTART, QLEN, KSTART_POS, KLEN,
        stride_qb, stride_qt, stride_qh,
        stride_kb, stride_kt, stride_kh,
        stride_vb, stride_vt, stride_vh,
        stride_ob, stride_ot, stride_oh,
        stride_cqb, stride_cqh, stride_ckb, stride_ckh,
        stride_lb, stride_lh,
        stride_thr_s, stride_kblo_s, stride_kblo_h, stride_kblo_r,
        scale2,
        GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
        CAUSAL: gl.constexpr, USE_ACP: gl.constexpr, STAGES: gl.constexpr,
        ACP_BLOCK_M: gl.constexpr, ACP_BLOCK_N: gl.constexpr, OVERLAP: gl.constexpr, num_warps: gl.constexpr,
    ):
        dtype: gl.constexpr = Q.dtype.element_ty
        # layouts: the wgmma accumulators of S [BLOCK_M, BLOCK_N] and
        # O [BLOCK_M, HEAD_DIM] (rows split over the warps), P as the
        # register operand of P V, and a 16-byte-per-thread load layout
        S_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BLOCK_N, 16])
        O_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, HEAD_DIM, 16])
        P_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_L, k_width=2)
        LOAD: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // HEAD_DIM, HEAD_DIM // 8], [num_warps, 1], [1, 0])
        gl.static_assert(BLOCK_M == 16 * num_warps)
        ROW_S: gl.constexpr = gl.SliceLayout(1, S_L)
        COL_S: gl.constexpr = gl.SliceLayout(0, S_L)
        ROW_O: gl.constexpr = gl.SliceLayout(1, O_L)
        Q_SMEM: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
        KV_SMEM: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
        PD: gl.constexpr = STAGES - 2  # tiles loaded ahead

        s_id = gl.program_id(1)
        h = gl.program_id(2)
        qlen = gl.load(QLEN + s_id)
        # causal: the last query blocks have the most tiles; launch them first
        if CAUSAL:
            pid_m = gl.cdiv(qlen, BLOCK_M) - 1 - gl.program_id(0)
        else:
            pid_m = gl.program_id(0)
        if (pid_m >= 0) & (pid_m * BLOCK_M < qlen):
            klen = gl.load(KLEN + s_id)
            row = gl.load(ROW + s_id).to(gl.int64)
            qrow = gl.load(QROW + s_id).to(gl.int64)
            q0 = gl.load(QSTART + s_id).to(gl.int64)
            k0 = gl.load(KSTART_POS + s_id).to(gl.int64)
            hk = h // GROUP

            # Q into shared memory (the A operand of every S MMA)
            offs_ml = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, LOAD))
            offs_dl = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, LOAD))
            q = gl.load(Q + qrow * stride_qb + h * stride_qh + (q0 + offs_ml)[:, None] * stride_qt + offs_dl[None, :],
                        mask=(offs_ml < qlen)[:, None], other=0.0)
            q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], Q_SMEM, q)
            k_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], KV_SMEM)
            v_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], KV_SMEM)

            offs_m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=ROW_S)
            offs_n = gl.arange(0, BLOCK_N, layout=COL_S)
            qmask = offs_m < qlen
            cq_base = CQ + qrow * stride_cqb + h * stride_cqh + q0
            # decays relative to the block's first query (triton_ops: "precise decays")
            c_ref = gl.load(cq_base + pid_m * BLOCK_M)
            cq2 = (gl.load(cq_base + offs_m, mask=qmask, other=0.0) - c_ref).to(gl.float32) * _LOG2E
            k_base = K + row * stride_kb + hk * stride_kh + k0 * stride_kt
            v_base = V + row * stride_vb + hk * stride_vh + k0 * stride_vt
            ck_base = CK + row * stride_ckb + h * stride_ckh + k0

            # tile ranges as in triton_ops._fwd_kernel
            if CAUSAL:
                hi = (gl.minimum((pid_m + 1) * BLOCK_M, qlen) - 1) // BLOCK_N + 1
                mid = (pid_m * BLOCK_M) // BLOCK_N
            else:
                hi = gl.cdiv(klen, BLOCK_N)
                mid = klen // BLOCK_N
            if USE_ACP:
                thr = gl.load(THR + s_id * stride_thr_s + h)
                # the boundaries are in ACP's tiles (ACP_BLOCK_M x ACP_BLOCK_N,
                # the Triton forward's): a query block inside a larger one
                # takes its bounds (they hold for every row of it), and a key
                # tile spanning R of ACP's starts at the first that holds a kept
                # key and is fully kept only if all R are
                R: gl.constexpr = BLOCK_N // ACP_BLOCK_N
                pm = pid_m // (ACP_BLOCK_M // BLOCK_M)
                lo = gl.load(KBLO + s_id * stride_kblo_s + h * stride_kblo_h + pm) // R
                part = gl.load(KBLO + s_id * stride_kblo_s + h * stride_kblo_h + stride_kblo_r + pm)
                full_lo = gl.maximum(gl.minimum((part + R - 1) // R, mid), lo)
                ck_min2 = cq2 - thr * _LOG2E
            else:
                lo = 0
                full_lo = 0
                ck_min2 = cq2
            mid = gl.maximum(mid, lo)
            if CAUSAL:
                k_last = gl.minimum(offs_m, klen - 1)
            else:
                k_last = gl.zeros_like(offs_m) + (klen - 1)
            n = hi - lo

            m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=ROW_S)
            l_i = gl.zeros([BLOCK_M], gl.float32, layout=ROW_S)
            acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=O_L)
            s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=S_L)

            if n > 0:
                # prologue: tiles 0 .. PD - 1 in flight, then tile PD, then
                # wait for tile 0 (PD groups may stay outstanding)
                for t in gl.static_range(PD):
                    _load_kv(k_bufs.index(t), v_bufs.index(t), k_base, v_base, stride_kt, stride_vt,
                             lo + t, t < n, klen, BLOCK_N, HEAD_DIM, LOAD)
                _load_kv(k_bufs.index(PD % STAGES), v_bufs.index(PD % STAGES), k_base, v_base, stride_kt, stride_vt,
                         lo + PD, PD < n, klen, BLOCK_N, HEAD_DIM, LOAD)
                offs_k = lo * BLOCK_N + offs_n
                ck2 = (gl.load(ck_base + offs_k, mask=offs_k < klen, other=0.0) - c_ref).to(gl.float32) * _LOG2E
                async_copy.wait_group(PD)
                gl.thread_barrier()
                fence_async_shared()
                s_tok = warpgroup_mma(q_smem, k_bufs.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
                s = warpgroup_mma_wait(0, deps=(s_tok,))
                masked = (lo < full_lo) | (lo >= mid)
                p, alpha, l_i, m_i = _softmax_tile(s, ck2, offs_k, k_last, ck_min2, m_i, l_i, scale2, masked, USE_ACP)
                p_op = gl.convert_layout(p.to(dtype), P_L)

                for i in range(1, n):
                    kb = lo + i
                    # tile i + PD into the buffer of tile i - 2 (its P V was
                    # waited for in the last iteration)
                    nb = (i + PD) % STAGES
                    _load_kv(k_bufs.index(nb), v_bufs.index(nb), k_base, v_base, stride_kt, stride_vt,
                             kb + PD, i + PD < n, klen, BLOCK_N, HEAD_DIM, LOAD)
                    offs_k = kb * BLOCK_N + offs_n
                    ck2 = (gl.load(ck_base + offs_k, mask=offs_k < klen, other=0.0) - c_ref).to(gl.float32) * _LOG2E
                    async_copy.wait_group(PD)
                    gl.thread_barrier()
                    fence_async_shared()
                    s_tok = warpgroup_mma(q_smem, k_bufs.index(i % STAGES).permute((1, 0)), s_zero,
                                          use_acc=False, is_async=True)
                    if OVERLAP:
                        o_tok = warpgroup_mma(p_op, v_bufs.index((i - 1) % STAGES), acc, is_async=True)
                        # S_i done (MMAs retire in order); P_{i-1} V_{i-1} may still run
                        s = warpgroup_mma_wait(1, deps=(s_tok,))
                    else:
                        s = warpgroup_mma_wait(0, deps=(s_tok,))
                        o_tok = warpgroup_mma(p_op, v_bufs.index((i - 1) % STAGES), acc, is_async=True)
                        acc = warpgroup_mma_wait(0, deps=(o_tok,))
                    masked = (kb < full_lo) | (kb >= mid)
                    p, alpha, l_i, m_i = _softmax_tile(s, ck2, offs_k, k_last, ck_min2, m_i, l_i, scale2, masked,
                                                       USE_ACP)
                    if OVERLAP:
                        acc = warpgroup_mma_wait(0, deps=(o_tok,))
                    acc = acc * gl.convert_layout(alpha, ROW_O)[:, None]
                    p_op = gl.convert_layout(p.to(dtype), P_L)

                o_tok = warpgroup_mma(p_op, v_bufs.index((n - 1) % STAGES), acc, is_async=True)
                acc = warpgroup_mma_wait(0, deps=(o_tok,))
                async_copy.wait_group(0)

            empty = l_i == 0.0
            l_safe = gl.where(empty, 1.0, l_i)
            # m_i is a maximum of s - c_i: the row's decay comes back here
            lse = gl.where(empty, float("-inf"), ((m_i + cq2) + gl.log2(l_safe)) * 0.6931471805599453)
            out = acc / gl.convert_layout(l_safe, ROW_O)[:, None]
            offs_mo = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=ROW_O)
            offs_do = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, O_L))
            o_ptrs = O + qrow * stride_ob + h * stride_oh + (q0 + offs_mo)[:, None] * stride_ot + offs_do[None, :]
            gl.store(o_ptrs, out.to(dtype), mask=(offs_mo < qlen)[:, None])
            gl.store(LSE + qrow * stride_lb + h * stride_lh + q0 + offs_m, lse, mask=qmask)


def launch_fwd(q, k, v, c_q, c_k, out, lse, thr, kblo, pairs, scale, causal, group, acp_blocks):
    """Launch the Gluon forward with triton_ops._forward's arguments (no
    partial result to merge into); acp_blocks: the (BLOCK_M, BLOCK_N) of
    kblo's tiles."""
    D = q.shape[-1]
    BM, BN, warps, stages = GLUON_FWD_CONFIGS[D]
    use_acp = thr is not None
    S = pairs.row.numel()
    grid = (triton.cdiv(max(pairs.max_qlen, 1), BM), S, q.shape[2])
    dummy_f = thr if use_acp else c_q
    dummy_i = kblo if use_acp else pairs.row.view(1, 1, 1, -1)
    _fwd_kernel_sm90[grid](
        q, k, v, c_q, c_k, out, lse, dummy_f, dummy_i,
        pairs.row, pairs.qrow, pairs.qstart, pairs.qlen, pairs.kstart, pairs.klen,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        c_q.stride(0), c_q.stride(1), c_k.stride(0), c_k.stride(1),
        lse.stride(0), lse.stride(1),
        dummy_f.stride(0), dummy_i.stride(0), dummy_i.stride(1), dummy_i.stride(2),
        scale * LOG2E,
        GROUP=group, HEAD_DIM=D, BLOCK_M=BM, BLOCK_N=BN, CAUSAL=causal, USE_ACP=use_acp, STAGES=stages,
        ACP_BLOCK_M=acp_blocks[0], ACP_BLOCK_N=acp_blocks[1], OVERLAP=OVERLAP, num_warps=warps,
    )
