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
so without ACP both kernels give the same result up to float32 summation
order (with it, the larger tiles here may keep a few more pairs below the
threshold: tile_ranges.py).  A query block visits its tiles in one pass
over [lo, hi); a tile takes the causal / length mask only when it lies in
the diagonal range [mid, hi) (a branch per tile: the pipelined MMAs want
one loop).

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

The kernel runs persistent (``_fwd_kernel_sm90_persistent``,
PERSISTENT_HEAD_DIMS): one CTA per SM takes (query block, sequence, head)
items from a counter in the per-block grid's launch order, as
FlashAttention-3's dynamic persistent scheduler does, so that a program's
launch, its wait for its first tiles and its set-up no longer sit between
two blocks' tiles: the load warp loads the next item's Q block and first
tiles while the MMA warps finish the item before, and publishes each
item's record in shared memory an item ahead.  Same results bit for bit;
on an H200 the 24 x 64 step ran 1.2-2.1% faster with ACP and within noise
without it (benchmarks/results/persistent_fwd_ab_h200.json), the forward
kernel alone 5.0% faster with ACP and 2.9% without at 8k
(acp_probe_8192_persistent_fwd_h200.json); the 16 x 128 step 1.2-1.8%
faster with ACP and 0.1-1.8% without (persistent_fwd_d128_ab_h200.json).
Earlier persistent versions
that looked each item up just before loading it were no faster with ACP
(README, kernel section).

Runs single-GPU / Ulysses calls on sm_90 at head dims 64 and 128 (``supported``)
while triton_ops.USE_GLUON_FWD is on (the default); context-parallel chunk
calls stay on the Triton kernel.
"""

from __future__ import annotations

import functools

import torch
import triton

from .tile_ranges import key_tiles, sequence_and_head, work_item

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
# the same tiles (attention_gluon_fwd_d64_h200.json), and three stages there
# were no faster with ACP either (gluon_fwd_stages3_d64_h200.json).
CONFIGS = {64: (128, 128, 8, 2), 128: (128, 128, 8, 2)}
# registers a thread at launch: one CTA per SM
MAXNREG = 168
# the persistent kernel (_fwd_kernel_sm90_persistent) instead of one
# program per query block, at these head dims: at 64 it made the 24 x 64
# step 1.2-2.1% faster with ACP and left it within noise without
# (persistent_fwd_ab_h200.json); at 128 the 16 x 128 step 1.2-1.8% faster
# with ACP and 0.1-1.8% without (persistent_fwd_d128_ab_h200.json, 2
# alternating rounds; a protocol run with it on there had been 0.0-0.8%
# slower than the run before, another machine start:
# attention_persistent_fwd_bench_h200.json)
PERSISTENT = True
PERSISTENT_HEAD_DIMS = (64, 128)
# at most this many CTAs in the persistent kernel (None: one per SM); the
# tests take a few, so that every CTA walks many items
PERSISTENT_CTAS = None


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
    return _is_sm90(_device_index(q.device))


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _sm_count(device: torch.device) -> int:
    return _sm_count_of(_device_index(device))


@functools.lru_cache(maxsize=None)
def _sm_count_of(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def persistent_grid(grid, device, max_ctas=None):
    """(CTAs, items, item counter) of a persistent kernel that walks the
    programs of a per-block grid (blocks, sequences, heads): at most one CTA
    per SM (fewer with max_ctas, and never more than there are items), and
    the zeroed int32 counter that hands out the items after each CTA's
    first."""
    total = grid[0] * grid[1] * grid[2]
    sms = _sm_count(device)
    return min(max_ctas or sms, sms, total), total, torch.zeros(1, dtype=torch.int32, device=device)


@functools.lru_cache(maxsize=None)
def _is_sm90(device_index: int) -> bool:
    # asked on every call: a device's capability does not change
    return torch.cuda.get_device_capability(device_index)[0] == 9


if HAVE_GLUON:

    @gluon.jit
    def _softmax_tile(s, ck2, offs_k, k_last, m_i, l_i, scale2, masked):
        # one tile's online softmax (triton_ops._fwd_tiles): t is the score
        # without the row's decay, so m_i is a maximum of t
        t = s * scale2 - ck2[None, :]
        if masked:
            t = gl.where(offs_k[None, :] <= k_last[:, None], t, float("-inf"))
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

    @gluon.jit
    def _load_kv_step(k_desc, v_desc, k_bufs, v_bufs, k_ready, k_empty, v_ready, v_empty, i, n, kv, lo, k_r, k_c,
                      v_r, v_c, STAGES: gl.constexpr, BLOCK_N: gl.constexpr):
        # step i (0 <= i <= n) of a query block's n key tiles from lo, at
        # ring position kv: K_i (i < n) beside V_{i-1} (i > 0), the order
        # in which the MMA warps use them (K_0, then S_i beside P_{i-1}
        # V_{i-1}): a K buffer is free once S has been computed from it, a
        # V buffer only once P V has, a tile later
        if i < n:
            g = kv + i
            b = g % STAGES
            mbarrier.wait(k_empty.index(b), (g // STAGES) & 1)
            mbarrier.expect(k_ready.index(b), k_desc.block_type.nbytes)
            tma_load(k_desc, [k_r + (lo + i) * BLOCK_N, k_c], k_ready.index(b), k_bufs.index(b))
        if i > 0:
            j = i - 1
            g = kv + j
            b = g % STAGES
            mbarrier.wait(v_empty.index(b), (g // STAGES) & 1)
            mbarrier.expect(v_ready.index(b), v_desc.block_type.nbytes)
            tma_load(v_desc, [v_r + (lo + j) * BLOCK_N, v_c], v_ready.index(b), v_bufs.index(b))

    @gluon.jit
    def _fwd_load_partition(q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_ready, k_ready, k_empty, v_ready,
                            v_empty, q_r0, q_c0, k_r0, k_c0, v_r0, v_c0, lo, n, STAGES: gl.constexpr,
                            BLOCK_N: gl.constexpr):
        # one warp: the query block (once, beside the first K tile), then K
        # and V tiles in rings of their own, in the order the MMA warps use
        # them (_load_kv_step)
        if n > 0:
            mbarrier.expect(q_ready, q_desc.block_type.nbytes)
            tma_load(q_desc, [q_r0, q_c0], q_ready, q_smem)
        for i in range(n + 1):
            _load_kv_step(k_desc, v_desc, k_bufs, v_bufs, k_ready, k_empty, v_ready, v_empty, i, n, 0, lo, k_r0, k_c0,
                          v_r0, v_c0, STAGES, BLOCK_N)

    @gluon.jit
    def _tile_decays(ck_base, kb, offs_c, klen, BLOCK_N: gl.constexpr):
        # key tile kb's decays in offs_c's layout (keys past the end: 0)
        return gl.load(ck_base + kb * BLOCK_N + offs_c, mask=kb * BLOCK_N + offs_c < klen, other=0.0)

    @gluon.jit
    def _pingpong_mma_partition(WG: gl.constexpr, q_smem, k_bufs, v_bufs, q_ready, k_ready, k_empty, v_ready, v_empty,
                                turns, cq_base, ck_base, c_ref, pid_m, qlen, klen, lo, mid, n, scale2,
                                o_base, stride_ot, lse_base, CAUSAL: gl.constexpr,
                                STAGES: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                                HEAD_DIM: gl.constexpr, num_warps: gl.constexpr):
        # one warpgroup: rows [WG * BLOCK_M, (WG + 1) * BLOCK_M) of the
        # CTA's query block, the same key tiles as the other warpgroup.
        # The two take turns to issue their MMAs (FlashAttention-3's
        # ping-pong, section 3.1): while one computes a tile's softmax the
        # other's MMAs run.  Each issues n + 1 times: S_0, then S_i with
        # P_{i-1} V_{i-1}, then P_{n-1} V_{n-1}.
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
            mbarrier.wait(q_ready, 0)
            mbarrier.wait(k_ready.index(0), 0)
            mbarrier.wait(my_turn, 0)
            s_tok = warpgroup_mma(q_rows, k_bufs.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            mbarrier.arrive(their_turn, count=1)
            s = warpgroup_mma_wait(0, deps=(s_tok,))
            mbarrier.arrive(k_empty.index(0), count=1)
            masked = lo >= mid
            p, alpha, l_i, m_i = _softmax_tile(s, ck2, offs_k, k_last, m_i, l_i, scale2, masked)
            p_op = gl.convert_layout(p.to(dtype), P_L)
            for i in range(1, n):
                kb = lo + i
                b = i % STAGES
                pb = (i - 1) % STAGES
                offs_k = kb * BLOCK_N + offs_n
                ck2 = (gl.convert_layout(ck_next, gl.SliceLayout(0, S_L)) - c_ref).to(gl.float32) * _LOG2E
                ck_next = _tile_decays(ck_base, kb + 1, offs_c, klen, BLOCK_N)
                mbarrier.wait(k_ready.index(b), (i // STAGES) & 1)
                mbarrier.wait(v_ready.index(pb), ((i - 1) // STAGES) & 1)
                mbarrier.wait(my_turn, i & 1)
                s_tok = warpgroup_mma(q_rows, k_bufs.index(b).permute((1, 0)), s_zero, use_acc=False, is_async=True)
                o_tok = warpgroup_mma(p_op, v_bufs.index(pb), acc, is_async=True)
                mbarrier.arrive(their_turn, count=1)
                s = warpgroup_mma_wait(1, deps=(s_tok,))
                mbarrier.arrive(k_empty.index(b), count=1)
                masked = kb >= mid
                p, alpha, l_i, m_i = _softmax_tile(s, ck2, offs_k, k_last, m_i, l_i, scale2, masked)
                acc = warpgroup_mma_wait(0, deps=(o_tok,))
                mbarrier.arrive(v_empty.index(pb), count=1)
                acc = acc * gl.convert_layout(alpha, ROW_O)[:, None]
                p_op = gl.convert_layout(p.to(dtype), P_L)
            mbarrier.wait(v_ready.index((n - 1) % STAGES), ((n - 1) // STAGES) & 1)
            mbarrier.wait(my_turn, n & 1)
            o_tok = warpgroup_mma(p_op, v_bufs.index((n - 1) % STAGES), acc, is_async=True)
            mbarrier.arrive(their_turn, count=1)
            acc = warpgroup_mma_wait(0, deps=(o_tok,))
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
    def _fwd_kernel_sm90_pingpong(
        q_desc, k_desc, v_desc, CQ, CK, O, LSE, KBLO,
        ROW, QROW, QSTART, QLEN, KSTART_POS, KLEN, ORDER,
        q_rows_b, q_cols_b, stride_qh,
        k_rows_b, k_cols_b, stride_kh, v_rows_b, v_cols_b, stride_vh,
        stride_ob, stride_ot, stride_oh,
        stride_cqb, stride_cqh, stride_ckb, stride_ckh,
        stride_lb, stride_lh,
        stride_kblo_s, stride_kblo_h,
        scale2,
        GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
        CAUSAL: gl.constexpr, USE_ACP: gl.constexpr, STAGES: gl.constexpr,
        ACP_BLOCK_M: gl.constexpr, ACP_BLOCK_N: gl.constexpr, ORDERED: gl.constexpr, num_warps: gl.constexpr,
    ):
        # the query block's two warpgroups in separate partitions that take
        # turns on the tensor cores: the default partition (num_warps = 4)
        # and a worker of 4 warps each own BLOCK_M / 2 rows; one load warp
        # feeds both (each buffer is released by both warpgroups), the query
        # block first, by TMA like K and V (Q of (row, token t, head) at
        # (row * q_rows_b + t, row * q_cols_b + head * stride_qh)), so that
        # its load overlaps the first K tile's
        dtype: gl.constexpr = q_desc.block_type.element_ty
        HALF: gl.constexpr = BLOCK_M // 2
        gl.static_assert(HALF == 16 * num_warps)

        s_id, h = sequence_and_head(ORDER, ORDERED)
        qlen = gl.load(QLEN + s_id)
        if CAUSAL:
            pid_m = gl.cdiv(qlen, BLOCK_M) - 1 - gl.program_id(0)
        else:
            pid_m = gl.program_id(0)
        if (pid_m >= 0) & (pid_m * BLOCK_M < qlen):
            klen = gl.load(KLEN + s_id)
            row = gl.load(ROW + s_id)
            qrow = gl.load(QROW + s_id).to(gl.int64)
            q0 = gl.load(QSTART + s_id).to(gl.int64)
            k0 = gl.load(KSTART_POS + s_id)
            hk = h // GROUP
            q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_desc.layout)
            q_ready = load_barrier()
            k_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
            v_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
            k_ready, k_empty = ring_barriers(STAGES, 2)
            v_ready, v_empty = ring_barriers(STAGES, 2)
            # whose turn it is to issue MMAs: warpgroup 0 first
            turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
            mbarrier.init(turns.index(0), count=1)
            mbarrier.init(turns.index(1), count=1)
            mbarrier.arrive(turns.index(0), count=1)
            fence_async_shared()

            cq_base = CQ + qrow * stride_cqb + h * stride_cqh + q0
            c_ref = gl.load(cq_base + pid_m * BLOCK_M)
            ck_base = CK + row.to(gl.int64) * stride_ckb + h * stride_ckh + k0
            lo, mid, hi = key_tiles(KBLO, s_id, h, pid_m, qlen, klen, stride_kblo_s, stride_kblo_h, BLOCK_M, BLOCK_N,
                                    ACP_BLOCK_M, ACP_BLOCK_N, CAUSAL, USE_ACP)
            n = hi - lo
            o_base = O + qrow * stride_ob + h * stride_oh + q0 * stride_ot
            lse_base = LSE + qrow * stride_lb + h * stride_lh + q0
            gl.warp_specialize(
                [(_pingpong_mma_partition, (0, q_smem, k_bufs, v_bufs, q_ready, k_ready, k_empty, v_ready, v_empty,
                                            turns, cq_base, ck_base, c_ref, pid_m, qlen, klen, lo, mid, n, scale2,
                                            o_base, stride_ot, lse_base, CAUSAL, STAGES, HALF, BLOCK_N, HEAD_DIM,
                                            num_warps)),
                 (_pingpong_mma_partition, (1, q_smem, k_bufs, v_bufs, q_ready, k_ready, k_empty, v_ready, v_empty,
                                            turns, cq_base, ck_base, c_ref, pid_m, qlen, klen, lo, mid, n, scale2,
                                            o_base, stride_ot, lse_base, CAUSAL, STAGES, HALF, BLOCK_N, HEAD_DIM,
                                            4)),
                 (_fwd_load_partition, (q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_ready, k_ready, k_empty,
                                        v_ready, v_empty, (qrow * q_rows_b + q0 + pid_m * BLOCK_M).to(gl.int32),
                                        (qrow * q_cols_b + h * stride_qh).to(gl.int32), row * k_rows_b + k0,
                                        row * k_cols_b + hk * stride_kh, row * v_rows_b + k0,
                                        row * v_cols_b + hk * stride_vh, lo, n, STAGES, BLOCK_N))],
                [4, 1], [240, 24])

    # ---- the persistent forward -------------------------------------------
    # One CTA per SM walks work items (query block, sequence, head) that it
    # takes from a global counter, as FlashAttention-3's dynamic persistent
    # scheduler does: the item order is the non-persistent grid's launch
    # order (query blocks fastest, longest first), and a CTA takes the next
    # item when it is ready for one, as the GPU hands a free SM the next
    # program.  What it saves is each program's fixed cost: the CTA's launch
    # and set-up, and the wait for its first tiles, which the load warp now
    # issues while the MMA warps finish the item before (two query buffers).
    # The load warp finds each item and publishes its record (REC_FIELDS
    # int32 in one of two shared slots, mbarriers per slot) an item ahead;
    # the MMA warps read it before the previous item's epilogue, so that
    # its decay loads are in flight during that epilogue.
    REC_FIELDS = gl.constexpr(16)

    @gluon.jit
    def _next_item(w, P, total, CNT, NUM_M, S, ORDER, QLEN, ORDERED: gl.constexpr, CAUSAL: gl.constexpr,
                   BLOCK_M: gl.constexpr):
        # the first valid item from w on, taking further ones from the
        # counter; w >= total when none is left (work_item's numbering; the
        # persistent dK / dV kernel passes key blocks, key lengths and
        # CAUSAL=False, its grid's key blocks running forward)
        s_id, h, pid_m, qlen, valid = work_item(w, total, NUM_M, S, ORDER, QLEN, ORDERED, CAUSAL, BLOCK_M)
        while (w < total) & (valid.to(gl.int32) == 0):
            w = P + gl.atomic_add(CNT, 1)
            s_id, h, pid_m, qlen, valid = work_item(w, total, NUM_M, S, ORDER, QLEN, ORDERED, CAUSAL, BLOCK_M)
        return w, s_id, h, pid_m, qlen

    @gluon.jit
    def _publish_item(items, t, item_ready, item_empty, w, total, s_id, h, pid_m, qlen, klen, lo, mid, n, row,
                      qrow, q0, k0):
        # the CTA's t-th item record, in shared slot t % 2 once the MMA
        # partitions have read the record before it there; w = -1 ends.
        # Every lane holds (and writes) the whole record.
        slot = t % 2
        mbarrier.wait(item_empty.index(slot), (t // 2) & 1)
        idx = gl.arange(0, REC_FIELDS, layout=gl.BlockedLayout([REC_FIELDS], [32], [1], [0]))
        rec = gl.where(idx == 0, gl.where(w < total, w, -1), 0)
        rec += gl.where(idx == 1, s_id, 0) + gl.where(idx == 2, h, 0) + gl.where(idx == 3, pid_m, 0)
        rec += gl.where(idx == 4, qlen, 0) + gl.where(idx == 5, klen, 0) + gl.where(idx == 6, lo, 0)
        rec += gl.where(idx == 7, mid, 0) + gl.where(idx == 8, n, 0) + gl.where(idx == 9, row, 0)
        rec += gl.where(idx == 10, qrow, 0) + gl.where(idx == 11, q0, 0) + gl.where(idx == 12, k0, 0)
        items.index(slot).store(rec)
        mbarrier.arrive(item_ready.index(slot), count=1)

    @gluon.jit
    def _fwd_item_tables(w, total, s_id, h, pid_m, qlen, KBLO, ROW, QROW, QSTART, KSTART_POS, KLEN,
                         stride_kblo_s, stride_kblo_h, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                         ACP_BLOCK_M: gl.constexpr, ACP_BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
                         USE_ACP: gl.constexpr):
        # an item's pair-table entries and key tiles [lo, hi) (diagonal
        # ones from mid); n = 0 past the last item
        ok = w < total
        klen = gl.load(KLEN + s_id)
        row = gl.load(ROW + s_id)
        qrow = gl.load(QROW + s_id)
        q0 = gl.load(QSTART + s_id)
        k0 = gl.load(KSTART_POS + s_id)
        lo, mid, hi = key_tiles(KBLO, s_id, h, gl.maximum(pid_m, 0), qlen, klen, stride_kblo_s, stride_kblo_h,
                                BLOCK_M, BLOCK_N, ACP_BLOCK_M, ACP_BLOCK_N, CAUSAL, USE_ACP)
        n = gl.where(ok, hi - lo, 0)
        return klen, row, qrow, q0, k0, lo, mid, n

    @gluon.jit
    def _persistent_load_partition(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_ready, q_empty, k_ready,
                                   k_empty, v_ready, v_empty, item_ready, item_empty, items, CNT, KBLO, ROW, QROW,
                                   QSTART, QLEN, KSTART_POS, KLEN, ORDER, NUM_M, S, total,
                                   q_rows_b, q_cols_b, stride_qh, k_rows_b, k_cols_b, stride_kh,
                                   v_rows_b, v_cols_b, stride_vh, stride_kblo_s, stride_kblo_h,
                                   GROUP: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                                   ACP_BLOCK_M: gl.constexpr, ACP_BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
                                   USE_ACP: gl.constexpr, ORDERED: gl.constexpr, STAGES: gl.constexpr):
        # one warp: for each item, its Q block and the tiles that fill the
        # rings (K_0, K_1, V_0), then the next item's record (found while
        # the MMA warps take those), then the item's other K and V tiles as
        # _fwd_load_partition streams them; ring positions and phases run
        # on over the items
        q_bytes: gl.constexpr = q_desc.block_type.nbytes
        pid = gl.program_id(0)
        P = gl.num_programs(0)
        w, s_id, h, pid_m, qlen = _next_item(pid, P, total, CNT, NUM_M, S, ORDER, QLEN, ORDERED, CAUSAL,
                                                 BLOCK_M)
        klen, row, qrow, q0, k0, lo, mid, n = _fwd_item_tables(
            w, total, s_id, h, pid_m, qlen, KBLO, ROW, QROW, QSTART, KSTART_POS, KLEN, stride_kblo_s, stride_kblo_h,
            BLOCK_M, BLOCK_N, ACP_BLOCK_M, ACP_BLOCK_N, CAUSAL, USE_ACP)
        _publish_item(items, 0, item_ready, item_empty, w, total, s_id, h, pid_m, qlen, klen, lo, mid, n,
                          row, qrow, q0, k0)
        t = 0
        kv = 0
        qc = 0
        while w < total:
            hk = h // GROUP
            q_r = (qrow * q_rows_b + q0 + pid_m * BLOCK_M).to(gl.int32)
            q_c = (qrow * q_cols_b + h * stride_qh).to(gl.int32)
            k_r = row * k_rows_b + k0
            k_c = row * k_cols_b + hk * stride_kh
            v_r = row * v_rows_b + k0
            v_c = row * v_cols_b + hk * stride_vh
            cur_lo = lo
            cur_n = n
            if cur_n > 0:
                qb = qc % 2
                mbarrier.wait(q_empty.index(qb), (qc // 2) & 1)
                mbarrier.expect(q_ready.index(qb), q_bytes)
                tma_load(q_desc, [q_r, q_c], q_ready.index(qb), q_bufs.index(qb))
                _load_kv_step(k_desc, v_desc, k_bufs, v_bufs, k_ready, k_empty, v_ready, v_empty, 0, cur_n, kv,
                              cur_lo, k_r, k_c, v_r, v_c, STAGES, BLOCK_N)
                _load_kv_step(k_desc, v_desc, k_bufs, v_bufs, k_ready, k_empty, v_ready, v_empty, 1, cur_n, kv,
                              cur_lo, k_r, k_c, v_r, v_c, STAGES, BLOCK_N)
            # the next item, found and published once this one's first
            # tiles fill the rings (the loads after them wait for the MMA
            # warps anyway)
            w, s_id, h, pid_m, qlen = _next_item(P + gl.atomic_add(CNT, 1), P, total, CNT, NUM_M, S, ORDER,
                                                     QLEN, ORDERED, CAUSAL, BLOCK_M)
            klen, row, qrow, q0, k0, lo, mid, n = _fwd_item_tables(
                w, total, s_id, h, pid_m, qlen, KBLO, ROW, QROW, QSTART, KSTART_POS, KLEN, stride_kblo_s,
                stride_kblo_h, BLOCK_M, BLOCK_N, ACP_BLOCK_M, ACP_BLOCK_N, CAUSAL, USE_ACP)
            t += 1
            _publish_item(items, t, item_ready, item_empty, w, total, s_id, h, pid_m, qlen, klen, lo, mid,
                              n, row, qrow, q0, k0)
            if cur_n > 0:
                for i in range(2, cur_n + 1):
                    _load_kv_step(k_desc, v_desc, k_bufs, v_bufs, k_ready, k_empty, v_ready, v_empty, i, cur_n, kv,
                                  cur_lo, k_r, k_c, v_r, v_c, STAGES, BLOCK_N)
                kv += cur_n
                qc += 1

    @gluon.jit
    def _record_field(rec, idx, f: gl.constexpr):
        # field f of a record that every thread holds whole (a maximum:
        # the same whatever the lanes and warps that hold copies)
        return gl.max(gl.where(idx == f, rec, -2147483647), 0)

    @gluon.jit
    def _read_item(items, t, item_ready, item_empty, num_warps: gl.constexpr):
        # the CTA's t-th item record (_publish_item)
        slot = t % 2
        mbarrier.wait(item_ready.index(slot), (t // 2) & 1)
        REC_L: gl.constexpr = gl.BlockedLayout([REC_FIELDS], [32], [num_warps], [0])
        rec = items.index(slot).load(REC_L)
        mbarrier.arrive(item_empty.index(slot), count=1)
        idx = gl.arange(0, REC_FIELDS, layout=REC_L)
        return (_record_field(rec, idx, 0), _record_field(rec, idx, 1), _record_field(rec, idx, 2),
                _record_field(rec, idx, 3), _record_field(rec, idx, 4), _record_field(rec, idx, 5),
                _record_field(rec, idx, 6), _record_field(rec, idx, 7), _record_field(rec, idx, 8),
                _record_field(rec, idx, 9), _record_field(rec, idx, 10), _record_field(rec, idx, 11),
                _record_field(rec, idx, 12))

    @gluon.jit
    def _fwd_item_decays(w, h, pid_m, qlen, klen, lo, row, qrow, q0, k0, CQ, CK, stride_cqb, stride_cqh, stride_ckb,
                         stride_ckh, offs_mr, offs_c, BLOCK_M2: gl.constexpr, BLOCK_N: gl.constexpr):
        # an item's decay loads, issued before they are needed: the
        # reference decay, the rows' decays and the first two key tiles'
        # (nothing past the last item)
        ok = w >= 0
        cq_base = CQ + qrow.to(gl.int64) * stride_cqb + h * stride_cqh + q0
        c_ref = gl.load(cq_base + pid_m * BLOCK_M2, mask=ok, other=0.0)
        offs_m = pid_m * BLOCK_M2 + offs_mr
        cq = gl.load(cq_base + offs_m, mask=ok & (offs_m < qlen), other=0.0)
        # (past the last item the record is a real sequence's, its lo >= 0:
        # the key tiles' loads stay in bounds without the item's mask)
        ck_base = CK + row.to(gl.int64) * stride_ckb + h * stride_ckh + k0
        ck_a = _tile_decays(ck_base, lo, offs_c, klen, BLOCK_N)
        ck_b = _tile_decays(ck_base, lo + 1, offs_c, klen, BLOCK_N)
        return c_ref, cq, ck_a, ck_b

    @gluon.jit
    def _persistent_mma_partition(WG: gl.constexpr, q_bufs, k_bufs, v_bufs, q_ready, q_empty, k_ready, k_empty,
                                  v_ready, v_empty, turns, item_ready, item_empty, items, CQ, CK, O, LSE,
                                  stride_ob, stride_ot, stride_oh, stride_cqb, stride_cqh, stride_ckb, stride_ckh,
                                  stride_lb, stride_lh, scale2, CAUSAL: gl.constexpr, STAGES: gl.constexpr,
                                  BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                                  num_warps: gl.constexpr):
        # _pingpong_mma_partition over the CTA's items: the ring positions
        # (kv), the query buffer (qc) and the turns run on over the items
        dtype: gl.constexpr = k_bufs.dtype
        S_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BLOCK_N, 16])
        O_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, HEAD_DIM, 16])
        P_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_L, k_width=2)
        ROW_S: gl.constexpr = gl.SliceLayout(1, S_L)
        ROW_O: gl.constexpr = gl.SliceLayout(1, O_L)
        COL_S: gl.constexpr = gl.SliceLayout(0, S_L)
        CK_L: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
        my_turn = turns.index(WG)
        their_turn = turns.index(1 - WG)
        offs_mr = WG * BLOCK_M + gl.arange(0, BLOCK_M, layout=ROW_S)
        offs_n = gl.arange(0, BLOCK_N, layout=COL_S)
        offs_c = gl.arange(0, BLOCK_N, layout=CK_L)
        offs_dr = WG * BLOCK_M + gl.arange(0, BLOCK_M, layout=ROW_O)
        offs_do = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, O_L))
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=S_L)
        w, _, h, pid_m, qlen, klen, lo, mid, n, row, qrow, q0, k0 = _read_item(items, 0, item_ready,
                                                                                      item_empty, num_warps)
        c_ref, cq, ck_a, ck_b = _fwd_item_decays(w, h, pid_m, qlen, klen, lo, row, qrow, q0, k0, CQ, CK, stride_cqb,
                                                 stride_cqh, stride_ckb, stride_ckh, offs_mr, offs_c, 2 * BLOCK_M,
                                                 BLOCK_N)
        t = 0
        kv = 0
        qc = 0
        turn = 0
        while w >= 0:
            offs_m = pid_m * (2 * BLOCK_M) + offs_mr
            cq2 = (cq - c_ref).to(gl.float32) * _LOG2E
            if CAUSAL:
                k_last = gl.minimum(offs_m, klen - 1)
            else:
                k_last = gl.zeros_like(offs_m) + (klen - 1)
            m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=ROW_S)
            l_i = gl.zeros([BLOCK_M], gl.float32, layout=ROW_S)
            acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=O_L)
            if n > 0:
                qb = qc % 2
                q_rows = q_bufs.index(qb).slice(WG * BLOCK_M, BLOCK_M)
                ck_base = CK + row.to(gl.int64) * stride_ckb + h * stride_ckh + k0
                offs_k = lo * BLOCK_N + offs_n
                ck2 = (gl.convert_layout(ck_a, COL_S) - c_ref).to(gl.float32) * _LOG2E
                ck_next = ck_b
                b = kv % STAGES
                mbarrier.wait(q_ready.index(qb), (qc // 2) & 1)
                mbarrier.wait(k_ready.index(b), (kv // STAGES) & 1)
                mbarrier.wait(my_turn, turn & 1)
                s_tok = warpgroup_mma(q_rows, k_bufs.index(b).permute((1, 0)), s_zero, use_acc=False, is_async=True)
                mbarrier.arrive(their_turn, count=1)
                s = warpgroup_mma_wait(0, deps=(s_tok,))
                mbarrier.arrive(k_empty.index(b), count=1)
                masked = lo >= mid
                p, alpha, l_i, m_i = _softmax_tile(s, ck2, offs_k, k_last, m_i, l_i, scale2, masked)
                p_op = gl.convert_layout(p.to(dtype), P_L)
                for i in range(1, n):
                    kb = lo + i
                    g = kv + i
                    b = g % STAGES
                    pb = (g - 1) % STAGES
                    offs_k = kb * BLOCK_N + offs_n
                    ck2 = (gl.convert_layout(ck_next, COL_S) - c_ref).to(gl.float32) * _LOG2E
                    ck_next = _tile_decays(ck_base, kb + 1, offs_c, klen, BLOCK_N)
                    mbarrier.wait(k_ready.index(b), (g // STAGES) & 1)
                    mbarrier.wait(v_ready.index(pb), ((g - 1) // STAGES) & 1)
                    mbarrier.wait(my_turn, (turn + i) & 1)
                    s_tok = warpgroup_mma(q_rows, k_bufs.index(b).permute((1, 0)), s_zero, use_acc=False,
                                          is_async=True)
                    o_tok = warpgroup_mma(p_op, v_bufs.index(pb), acc, is_async=True)
                    mbarrier.arrive(their_turn, count=1)
                    s = warpgroup_mma_wait(1, deps=(s_tok,))
                    mbarrier.arrive(k_empty.index(b), count=1)
                    masked = kb >= mid
                    p, alpha, l_i, m_i = _softmax_tile(s, ck2, offs_k, k_last, m_i, l_i, scale2, masked)
                    acc = warpgroup_mma_wait(0, deps=(o_tok,))
                    mbarrier.arrive(v_empty.index(pb), count=1)
                    acc = acc * gl.convert_layout(alpha, ROW_O)[:, None]
                    p_op = gl.convert_layout(p.to(dtype), P_L)
                # every S of the item is computed: its query buffer is free
                mbarrier.arrive(q_empty.index(qb), count=1)
                g = kv + n - 1
                mbarrier.wait(v_ready.index(g % STAGES), (g // STAGES) & 1)
                mbarrier.wait(my_turn, (turn + n) & 1)
                o_tok = warpgroup_mma(p_op, v_bufs.index(g % STAGES), acc, is_async=True)
                mbarrier.arrive(their_turn, count=1)
                acc = warpgroup_mma_wait(0, deps=(o_tok,))
                mbarrier.arrive(v_empty.index(g % STAGES), count=1)
                kv += n
                qc += 1
                turn += n + 1
            # the next item's record and decays, in flight during this epilogue
            t += 1
            (nw, _, nh, npid_m, nqlen, nklen, nlo, nmid, nn, nrow, nqrow, nq0,
             nk0) = _read_item(items, t, item_ready, item_empty, num_warps)
            c_ref, cq, ck_a, ck_b = _fwd_item_decays(nw, nh, npid_m, nqlen, nklen, nlo, nrow, nqrow, nq0, nk0, CQ,
                                                     CK, stride_cqb, stride_cqh, stride_ckb, stride_ckh, offs_mr,
                                                     offs_c, 2 * BLOCK_M, BLOCK_N)
            empty_row = l_i == 0.0
            l_safe = gl.where(empty_row, 1.0, l_i)
            lse = gl.where(empty_row, float("-inf"), ((m_i + cq2) + gl.log2(l_safe)) * 0.6931471805599453)
            out = acc / gl.convert_layout(l_safe, ROW_O)[:, None]
            o_base = O + qrow.to(gl.int64) * stride_ob + h * stride_oh + q0.to(gl.int64) * stride_ot
            lse_base = LSE + qrow.to(gl.int64) * stride_lb + h * stride_lh + q0
            offs_mo = pid_m * (2 * BLOCK_M) + offs_dr
            gl.store(o_base + offs_mo[:, None] * stride_ot + offs_do[None, :], out.to(dtype),
                     mask=(offs_mo < qlen)[:, None])
            gl.store(lse_base + offs_m, lse, mask=offs_m < qlen)
            w = nw
            h = nh
            pid_m = npid_m
            qlen = nqlen
            klen = nklen
            lo = nlo
            mid = nmid
            n = nn
            row = nrow
            qrow = nqrow
            q0 = nq0
            k0 = nk0

    @gluon.jit
    def _fwd_kernel_sm90_persistent(
        q_desc, k_desc, v_desc, CQ, CK, O, LSE, KBLO,
        ROW, QROW, QSTART, QLEN, KSTART_POS, KLEN, ORDER, CNT,
        num_m, num_s, total,
        q_rows_b, q_cols_b, stride_qh,
        k_rows_b, k_cols_b, stride_kh, v_rows_b, v_cols_b, stride_vh,
        stride_ob, stride_ot, stride_oh,
        stride_cqb, stride_cqh, stride_ckb, stride_ckh,
        stride_lb, stride_lh,
        stride_kblo_s, stride_kblo_h,
        scale2,
        GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
        CAUSAL: gl.constexpr, USE_ACP: gl.constexpr, STAGES: gl.constexpr,
        ACP_BLOCK_M: gl.constexpr, ACP_BLOCK_N: gl.constexpr, ORDERED: gl.constexpr, num_warps: gl.constexpr,
    ):
        # _fwd_kernel_sm90_pingpong's partitions, persistent: a grid of at
        # most one CTA per SM; CNT (zero at launch) hands out the items
        # after each CTA's first (its program id)
        dtype: gl.constexpr = q_desc.block_type.element_ty
        HALF: gl.constexpr = BLOCK_M // 2
        gl.static_assert(HALF == 16 * num_warps)
        q_bufs = gl.allocate_shared_memory(dtype, [2, BLOCK_M, HEAD_DIM], q_desc.layout)
        k_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
        v_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
        q_ready, q_empty = ring_barriers(2, 2)
        k_ready, k_empty = ring_barriers(STAGES, 2)
        v_ready, v_empty = ring_barriers(STAGES, 2)
        item_ready, item_empty = ring_barriers(2, 2)
        items = gl.allocate_shared_memory(gl.int32, [2, REC_FIELDS], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(turns.index(0), count=1)
        mbarrier.init(turns.index(1), count=1)
        mbarrier.arrive(turns.index(0), count=1)
        fence_async_shared()
        gl.warp_specialize(
            [(_persistent_mma_partition, (0, q_bufs, k_bufs, v_bufs, q_ready, q_empty, k_ready, k_empty, v_ready,
                                          v_empty, turns, item_ready, item_empty, items, CQ, CK, O, LSE,
                                          stride_ob, stride_ot, stride_oh, stride_cqb, stride_cqh, stride_ckb,
                                          stride_ckh, stride_lb, stride_lh, scale2, CAUSAL, STAGES, HALF, BLOCK_N,
                                          HEAD_DIM, num_warps)),
             (_persistent_mma_partition, (1, q_bufs, k_bufs, v_bufs, q_ready, q_empty, k_ready, k_empty, v_ready,
                                          v_empty, turns, item_ready, item_empty, items, CQ, CK, O, LSE,
                                          stride_ob, stride_ot, stride_oh, stride_cqb, stride_cqh, stride_ckb,
                                          stride_ckh, stride_lb, stride_lh, scale2, CAUSAL, STAGES, HALF, BLOCK_N,
                                          HEAD_DIM, 4)),
             (_persistent_load_partition, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_ready, q_empty, k_ready,
                                           k_empty, v_ready, v_empty, item_ready, item_empty, items, CNT, KBLO, ROW,
                                           QROW, QSTART, QLEN, KSTART_POS, KLEN, ORDER, num_m, num_s, total,
                                           q_rows_b, q_cols_b, stride_qh, k_rows_b, k_cols_b, stride_kh,
                                           v_rows_b, v_cols_b, stride_vh, stride_kblo_s, stride_kblo_h,
                                           GROUP, BLOCK_M, BLOCK_N, ACP_BLOCK_M, ACP_BLOCK_N, CAUSAL, USE_ACP,
                                           ORDERED, STAGES))],
            [4, 1], [240, 24])


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


@functools.lru_cache(maxsize=None)
def _shared_layout(block_rows: int, head_dim: int, dtype: torch.dtype):
    # the TMA boxes' shared layout, built once per shape (an immutable
    # Gluon object; building it took a good part of a launch's host time)
    gl_dtype = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32}[dtype]
    return gl.NVMMASharedLayout.get_default_for([block_rows, head_dim], gl_dtype)


def tma_descriptors(tensors, block_rows):
    """2-D TMA descriptors of bshd tensors through their ``_tma_rows_view``
    (boxes of block_rows x head dim), and the views."""
    D = tensors[0].shape[-1]
    layout = _shared_layout(block_rows, D, tensors[0].dtype)
    views = [_tma_rows_view(t) for t in tensors]
    descs = [TensorDescriptor(t, [rows, cols], [cols, 1], [block_rows, D], layout)
             for t, (rows, cols, _, _) in zip(tensors, views)]
    return descs, views


def launch_fwd(q, k, v, c_q, c_k, out, lse, thr, kblo, pairs, scale, causal, group, acp_blocks):
    """Launch the Gluon forward with triton_ops._forward's arguments (no
    partial result to merge into; ``supported`` holds); acp_blocks: the
    (BLOCK_M, BLOCK_N) of kblo's tiles.  The pairs are launched in the
    table's ``order_q`` when it has one (triton_ops.heavy_first)."""
    D = q.shape[-1]
    BM, BN, warps, stages = CONFIGS[D]
    descs, kv = tma_descriptors((k, v), BN)
    use_acp = thr is not None
    S = pairs.row.numel()
    order, ordered = pairs.launch_order()
    grid = (triton.cdiv(max(pairs.max_qlen, 1), BM), S, q.shape[2])
    kb = kblo if use_acp else pairs.row.view(1, 1, -1)
    assert warps == 8, "the ping-pong kernel runs two partitions of 4 MMA warps"
    (q_desc,), (q_view,) = tma_descriptors((q,), BM)
    # the arguments both kernels take: the pair table (and launch order),
    # then the strides and the scale
    tables = (pairs.row, pairs.qrow, pairs.qstart, pairs.qlen, pairs.kstart, pairs.klen,
              order)
    strides = (q_view[2], q_view[3], q.stride(2),
               kv[0][2], kv[0][3], k.stride(2), kv[1][2], kv[1][3], v.stride(2),
               out.stride(0), out.stride(1), out.stride(2),
               c_q.stride(0), c_q.stride(1), c_k.stride(0), c_k.stride(1),
               lse.stride(0), lse.stride(1),
               kb.stride(0), kb.stride(1),
               scale * LOG2E)
    consts = dict(GROUP=group, HEAD_DIM=D, BLOCK_M=BM, BLOCK_N=BN, CAUSAL=causal, USE_ACP=use_acp, STAGES=stages,
                  ACP_BLOCK_M=acp_blocks[0], ACP_BLOCK_N=acp_blocks[1], ORDERED=ordered, num_warps=4,
                  maxnreg=MAXNREG)
    if PERSISTENT and D in PERSISTENT_HEAD_DIMS:
        ctas, total, counter = persistent_grid(grid, q.device, PERSISTENT_CTAS)
        _fwd_kernel_sm90_persistent[(ctas,)](q_desc, descs[0], descs[1], c_q, c_k, out, lse, kb, *tables, counter,
                                             grid[0], S, total, *strides, **consts)
        return
    _fwd_kernel_sm90_pingpong[grid](q_desc, descs[0], descs[1], c_q, c_k, out, lse, kb, *tables, *strides, **consts)
