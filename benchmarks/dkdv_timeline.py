"""Where a key block's time goes in the Gluon dK / dV kernel: clock stamps inside the kernel.

    python benchmarks/dkdv_timeline.py --lengths 8192,16384 --shapes 24x64,16x128 \\
        --out benchmarks/results/dkdv_timeline_h200.json
    python benchmarks/dkdv_timeline.py --compile-only     # CPU: the stamps still apply and compile

The dK / dV counterpart of fwd_timeline.py, with its slots, stamp helpers
and summary: a patched copy of kernels/forgetting_attn/gluon_bwd.py (the
kernel itself carries no instrumentation) writes, per program (one key
block of one key / value head), the SM clock at its start, when the load
warp has issued the K and V loads, when the MMA warps have their first Q /
dO tile, after that first tile, after the last one (before dK and dV are
stored) and after the stores, plus its SM, its tiles over all query heads
of the group, how many of them take the causal mask (the diagonal ones) and the global timer. The kernel runs as
the backward calls it (with the fused dQ where gluon_bwd.DISPATCH says so,
head dim 128), on BENCH.md's inputs.  It stamps the per-block kernel
(``_dkdv_kernel_sm90``, gluon_bwd.PERSISTENT off for the run): the
persistent one that head dim 64 runs by default has no stamps yet.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from benchmarks.fwd_timeline import (  # noqa: E402
    END, FIRST_DATA, FIRST_TILE, FIRST_TMA, GT_END, GT_START, LOOP_END, MASKED, SLOTS, SM, START, STAMP_HELPERS,
    TILES, apply_patches, load_stamped, timeline_main)

SOURCE = os.path.join(ROOT, "kernels", "forgetting_attn", "gluon_bwd.py")

# (name, anchor, replacement): each anchor must occur exactly once
PATCHES = [
    ("helpers", "    @gluon.jit\n    def _bwd_load_partition(",
     STAMP_HELPERS + "    @gluon.jit\n    def _bwd_load_partition("),
    ("load warp signature",
     "stride_doh, k_r0, k_c0, v_r0, v_c0, stride_qbhi_s, stride_qbhi_h,\n",
     "stride_doh, k_r0, k_c0, v_r0, v_c0, stride_qbhi_s, stride_qbhi_h, tl_base,\n"),
    ("first TMA",
     "        tma_load(v_desc, [v_r0, v_c0], kv_ready, v_smem)\n",
     "        tma_load(v_desc, [v_r0, v_c0], kv_ready, v_smem)\n"
     "        TL_L: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])\n"
     f"        _tl_put(tl_base, {FIRST_TMA}, _tl_clock(TL_L), TL_L)\n"),
    ("MMA partition signature",
     "stride_qbhi_s, stride_qbhi_h, scale, scale2,\n"
     "                           GROUP: gl.constexpr,",
     "stride_qbhi_s, stride_qbhi_h, scale, scale2, tl_base,\n"
     "                           GROUP: gl.constexpr,"),
    ("counters",
     "        it = 0\n        for g in range(GROUP):\n            h = hk * GROUP + g\n            # [lo, mid)",
     "        TL_M: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])\n"
     "        tl_tiles = 0\n        tl_masked = 0\n"
     "        it = 0\n        for g in range(GROUP):\n            h = hk * GROUP + g\n            # [lo, mid)"),
    ("tile count",
     "            ck, c_ref_n, cq_n, lse_n, dlt_n = _head_terms(CK, CQ, LSE, DLT, row, qrow, q0, k0, h, lo, qlen,",
     "            tl_tiles += hi - lo\n"
     "            tl_masked += mid - lo\n"
     "            ck, c_ref_n, cq_n, lse_n, dlt_n = _head_terms(CK, CQ, LSE, DLT, row, qrow, q0, k0, h, lo, qlen,"),
    ("first data",
     "                mbarrier.wait(ready.index(b), (it // STAGES) & 1)\n                q_buf = q_bufs.index(b)\n",
     "                mbarrier.wait(ready.index(b), (it // STAGES) & 1)\n"
     "                if it == 0:\n"
     f"                    _tl_put(tl_base, {FIRST_DATA}, _tl_clock(TL_M), TL_M)\n"
     "                q_buf = q_bufs.index(b)\n"),
    ("first tile",
     "                    mbarrier.arrive(empty.index(b), count=1)\n                it += 1\n",
     "                    mbarrier.arrive(empty.index(b), count=1)\n"
     "                if it == 0:\n"
     f"                    _tl_put(tl_base, {FIRST_TILE}, _tl_clock(TL_M), TL_M)\n"
     "                it += 1\n"),
    ("loop end",
     "        offs_ng = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, G_L))\n",
     f"        _tl_put(tl_base, {LOOP_END}, _tl_clock(TL_M), TL_M)\n"
     "        offs_ng = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, G_L))\n"),
    ("end",
     "                 dv.to(DV.dtype.element_ty), mask=gmask)\n",
     "                 dv.to(DV.dtype.element_ty), mask=gmask)\n"
     f"        _tl_put(tl_base, {END}, _tl_clock(TL_M), TL_M)\n"
     f"        _tl_put(tl_base, {GT_END}, _tl_gtimer(TL_M), TL_M)\n"
     f"        _tl_put(tl_base, {TILES}, gl.full([1], 0, gl.int64, TL_M) + tl_tiles, TL_M)\n"
     f"        _tl_put(tl_base, {MASKED}, gl.full([1], 0, gl.int64, TL_M) + tl_masked, TL_M)\n"),
    ("kernel signature",
     "QBHI, DK, DV, DCK, dqa_desc, dcq_desc,\n",
     "QBHI, DK, DV, DCK, dqa_desc, dcq_desc, TLB,\n"),
    ("start",
     "        if pid_n * BLOCK_N < klen:\n",
     "        if pid_n * BLOCK_N < klen:\n"
     "            TL_K: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])\n"
     "            tl_prog = pid_n + gl.num_programs(0) * (s_id + gl.num_programs(1) * hk)\n"
     f"            tl_base = TLB + tl_prog.to(gl.int64) * {SLOTS}\n"
     f"            _tl_put(tl_base, {START}, _tl_clock(TL_K), TL_K)\n"
     f"            _tl_put(tl_base, {GT_START}, _tl_gtimer(TL_K), TL_K)\n"
     f"            _tl_put(tl_base, {SM}, _tl_smid(TL_K), TL_K)\n"),
    ("MMA partition's arguments",
     "stride_qbhi_h, scale,\n                                       scale2, GROUP,",
     "stride_qbhi_h, scale,\n                                       scale2, tl_base, GROUP,"),
    ("load warp's arguments",
     "stride_qbhi_h, GROUP, USE_ACP, STAGES, BLOCK_M, BLOCK_N,\n",
     "stride_qbhi_h, tl_base, GROUP, USE_ACP, STAGES, BLOCK_M, BLOCK_N,\n"),
    ("launch",
     "(*tensors, dqa_desc, dcq_desc, *tables,",
     "(*tensors, dqa_desc, dcq_desc, TIMELINE['buf'], *tables,"),
    ("buffer", "\ndef launch_dkdv(", "\nTIMELINE = {'buf': None}\n\n\ndef launch_dkdv("),
]


def patched_source(text: str) -> str:
    return apply_patches(text, PATCHES, {}, SOURCE, "dkdv_timeline")


def load_patched():
    """The stamped dK / dV kernel's module."""
    return load_stamped(SOURCE, patched_source, "dkdv_timeline")


def compile_only():
    """Compile the stamped kernel for sm_90 (no GPU needed): head dim 64
    without the fused dQ, 128 with it, ACP off and on."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import triton_compile_worker as worker

    module = load_patched()
    for D, fused in ((64, False), (128, True)):
        for acp in (False, True):
            consts, opts = worker.gluon_dkdv_case(module, D, fused, group=1, acp=acp)
            worker.compile_gluon(module._dkdv_kernel_sm90, consts, **opts)
            print(f"compiled: head dim {D}, fused dQ {fused}, ACP {acp}", flush=True)


def main():
    import triton

    from benchmarks.kernel_versions import KERNELS

    fused_at = KERNELS["dkdv"][3][0]  # launch_dkdv's dq_acc: given when the dQ is fused
    timeline_main(__doc__.split("\n\n")[0], "dkdv", "dkdv_timeline", load_patched, compile_only,
                  lambda tree, D, L, B, H, Hkv: triton.cdiv(L, tree.CONFIGS[D][1]) * B * Hkv,
                  lambda call: dict(fused_dq=len(call) > fused_at and call[fused_at] is not None))


if __name__ == "__main__":
    main()
