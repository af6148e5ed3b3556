"""Where a query block's time goes in the Gluon forward: clock stamps inside the kernel.

    python benchmarks/fwd_timeline.py --lengths 8192,16384 --shapes 24x64 \\
        --out benchmarks/results/fwd_timeline_h200.json
    python benchmarks/fwd_timeline.py --compile-only     # CPU: the stamps still apply and compile

The tool patches a copy of kernels/forgetting_attn/gluon_fwd.py's source
(the kernel itself carries no instrumentation): each program writes the SM
clock (%clock64) at its start, when its load warp has issued the query
block's TMA, when its first warpgroup has its first query and key tiles,
when that warpgroup has the first tile's probabilities, before its
last P V, and after its output stores, plus its SM (%smid), its tile count, how
many of those tiles take the causal mask (the diagonal ones) and the global timer (%globaltimer, to turn clocks
into microseconds). A patch whose anchor is no longer in the source stops
the tool with its name (the kernel changed: update PATCHES).

From the stamps, per program (medians, microseconds): start to the first
TMA, start to the first data, the first tile (its S and softmax, which no
other MMA of this warpgroup overlaps), the main loop (and its fits a + b *
tiles, and a + b * plain tiles + c * masked tiles over the launch's
programs: b per tile, c per masked tile, a what a program pays in its loop
beyond its tiles), the epilogue (last P V, normalisation, stores) and the
gap between one program's end and the next program's start on the same SM
(the CTA's exit and the next one's launch). The kernel runs once per case
with BENCH.md's inputs (paper-like gates, B = 32768 / L, QK-norm bound
sqrt(D)); its time with and without the stamps is reported too (the stamps
cost little, but not nothing).

It stamps and times the per-block forward (``_fwd_kernel_sm90_pingpong``,
gluon_fwd.PERSISTENT off for the run): the persistent kernel that runs by
default walks many blocks per CTA and has no stamps yet.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

SOURCE = os.path.join(ROOT, "kernels", "forgetting_attn", "gluon_fwd.py")
SLOTS = 16  # int64 stamps a program
# slot: what it holds
START, SM, FIRST_DATA, LOOP_END, END, FIRST_TMA, TILES, GT_START, GT_END, MASKED, FIRST_TILE = range(11)

STAMP_HELPERS = '''    @gluon.jit
    def _tl_clock(L: gl.constexpr):
        z = gl.full([1], 0, gl.int32, L)
        return gl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l,r", [z], dtype=gl.int64, is_pure=False, pack=1)

    @gluon.jit
    def _tl_gtimer(L: gl.constexpr):
        z = gl.full([1], 0, gl.int32, L)
        return gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [z], dtype=gl.int64, is_pure=False,
                                         pack=1)

    @gluon.jit
    def _tl_smid(L: gl.constexpr):
        z = gl.full([1], 0, gl.int32, L)
        return gl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [z], dtype=gl.int32, is_pure=False,
                                         pack=1).to(gl.int64)

    @gluon.jit
    def _tl_put(tl_base, slot: gl.constexpr, val, L: gl.constexpr):
        gl.store(tl_base + slot + gl.arange(0, 1, L), val)

'''

# (name, anchor, replacement): each anchor must occur exactly once
PATCHES = [
    ("helpers", "    @gluon.jit\n    def ring_barriers(", STAMP_HELPERS + "    @gluon.jit\n    def ring_barriers("),
    ("load warp signature",
     "v_empty, q_r0, q_c0, k_r0, k_c0, v_r0, v_c0, lo, n, STAGES: gl.constexpr,",
     "v_empty, q_r0, q_c0, k_r0, k_c0, v_r0, v_c0, lo, n, tl_base, STAGES: gl.constexpr,"),
    ("first TMA",
     "            tma_load(q_desc, [q_r0, q_c0], q_ready, q_smem)\n",
     "            tma_load(q_desc, [q_r0, q_c0], q_ready, q_smem)\n"
     "            TL_L: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])\n"
     f"            _tl_put(tl_base, {FIRST_TMA}, _tl_clock(TL_L), TL_L)\n"),
    ("MMA partition signature",
     "o_base, stride_ot, lse_base, CAUSAL: gl.constexpr,",
     "o_base, stride_ot, lse_base, tl_base, CAUSAL: gl.constexpr,"),
    ("first tile",
     "            p_op = gl.convert_layout(p.to(dtype), P_L)\n            for i in range(1, n):\n",
     "            p_op = gl.convert_layout(p.to(dtype), P_L)\n"
     "            if WG == 0:\n"
     f"                _tl_put(tl_base, {FIRST_TILE}, _tl_clock(TL_M), TL_M)\n"
     "            for i in range(1, n):\n"),
    ("first data",
     "            mbarrier.wait(k_ready.index(0), 0)\n",
     "            mbarrier.wait(k_ready.index(0), 0)\n"
     "            TL_M: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])\n"
     "            if WG == 0:\n"
     f"                _tl_put(tl_base, {FIRST_DATA}, _tl_clock(TL_M), TL_M)\n"),
    ("loop end",
     "            mbarrier.wait(v_ready.index((n - 1) % STAGES), ((n - 1) // STAGES) & 1)\n",
     "            if WG == 0:\n"
     f"                _tl_put(tl_base, {LOOP_END}, _tl_clock(TL_M), TL_M)\n"
     "            mbarrier.wait(v_ready.index((n - 1) % STAGES), ((n - 1) // STAGES) & 1)\n"),
    ("end",
     "        gl.store(lse_base + offs_m, lse, mask=qmask)\n",
     "        gl.store(lse_base + offs_m, lse, mask=qmask)\n"
     "        if WG == 0:\n"
     "            TL_E: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])\n"
     f"            _tl_put(tl_base, {END}, _tl_clock(TL_E), TL_E)\n"
     f"            _tl_put(tl_base, {GT_END}, _tl_gtimer(TL_E), TL_E)\n"),
    ("kernel signature",
     "def _fwd_kernel_sm90_pingpong(\n        q_desc, k_desc, v_desc, CQ, CK, O, LSE, KBLO,\n",
     "def _fwd_kernel_sm90_pingpong(\n        q_desc, k_desc, v_desc, CQ, CK, O, LSE, KBLO, TLB,\n"),
    ("start",
     "        if (pid_m >= 0) & (pid_m * BLOCK_M < qlen):\n",
     "        if (pid_m >= 0) & (pid_m * BLOCK_M < qlen):\n"
     "            TL_K: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])\n"
     "            tl_prog = gl.program_id(0) + gl.num_programs(0) * (s_id + gl.num_programs(1) * h)\n"
     f"            tl_base = TLB + tl_prog.to(gl.int64) * {SLOTS}\n"
     f"            _tl_put(tl_base, {START}, _tl_clock(TL_K), TL_K)\n"
     f"            _tl_put(tl_base, {GT_START}, _tl_gtimer(TL_K), TL_K)\n"
     f"            _tl_put(tl_base, {SM}, _tl_smid(TL_K), TL_K)\n"),
    ("tile count",
     "            n = hi - lo\n",
     "            n = hi - lo\n"
     f"            _tl_put(tl_base, {TILES}, gl.full([1], 0, gl.int64, TL_K) + n, TL_K)\n"
     f"            _tl_put(tl_base, {MASKED}, gl.full([1], 0, gl.int64, TL_K) + (hi - mid), TL_K)\n"),
    ("MMA partitions' arguments",
     "o_base, stride_ot, lse_base, CAUSAL, STAGES,",
     "o_base, stride_ot, lse_base, tl_base, CAUSAL, STAGES,"),
    ("load warp's arguments",
     "row * v_cols_b + hk * stride_vh, lo, n, STAGES, BLOCK_N))],",
     "row * v_cols_b + hk * stride_vh, lo, n, tl_base, STAGES, BLOCK_N))],"),
    ("launch",
     "_fwd_kernel_sm90_pingpong[grid](q_desc, descs[0], descs[1], c_q, c_k, out, lse, kb, *tables,",
     "_fwd_kernel_sm90_pingpong[grid](q_desc, descs[0], descs[1], c_q, c_k, out, lse, kb, TIMELINE['buf'], *tables,"),
    ("buffer", "\ndef launch_fwd(", "\nTIMELINE = {'buf': None}\n\n\ndef launch_fwd("),
]
# anchors that occur more than once, each replaced everywhere
REPEATED = {"MMA partitions' arguments": 2}


def apply_patches(text: str, patches, repeated, source: str, tool: str) -> str:
    """text with every (name, anchor, replacement) of patches applied; an
    anchor found other than once (repeated[name] times where given) stops
    the tool with the patch's name."""
    for name, anchor, replacement in patches:
        found = text.count(anchor)
        if found != repeated.get(name, 1):
            raise SystemExit(f"{tool}: patch '{name}' found its anchor {found} times in {source}; "
                             f"the kernel changed, update PATCHES")
        text = text.replace(anchor, replacement)
    return text


def patched_source(text: str) -> str:
    return apply_patches(text, PATCHES, REPEATED, SOURCE, "fwd_timeline")


def load_stamped(source: str, patch, tool: str):
    """The kernel module at source, patched by patch(text), loaded beside the
    package's modules (so that its relative imports resolve); the patched
    file lives in a temporary directory."""
    with open(source) as f:
        text = patch(f.read())
    tmp = tempfile.mkdtemp(prefix=f"{tool}_")
    path = os.path.join(tmp, f"{tool}.py")
    with open(path, "w") as f:
        f.write(text)
    from benchmarks.kernel_versions import load_base

    return load_base(path, tool)


def load_patched():
    """The stamped forward."""
    return load_stamped(SOURCE, patched_source, "fwd_timeline")


def compile_only():
    """Compile the stamped kernel for sm_90 (no GPU needed), with and
    without ACP."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import triton_compile_worker as worker

    module = load_patched()
    for D in module.CONFIGS:
        for acp in (False, True):
            consts, opts = worker.gluon_fwd_case(module, D, group=1, acp=acp)
            worker.compile_gluon(module._fwd_kernel_sm90_pingpong, consts, **opts)
            print(f"compiled: head dim {D}, ACP {acp}", flush=True)


def summarise(stamps, clocks_per_ns=None):
    """Per-program phases (microseconds, medians) from the [programs, SLOTS]
    stamps of one launch (rows of programs that did not run are zero)."""
    rows = [r for r in stamps if r[START] != 0]
    if clocks_per_ns is None:
        clocks_per_ns = statistics.median((r[END] - r[START]) / (r[GT_END] - r[GT_START])
                                          for r in rows if r[GT_END] - r[GT_START] > 2000)

    def us(c):
        return c / clocks_per_ns / 1000.0

    # the main loop of every program that stamped both its ends
    loops = [(r, us(r[LOOP_END] - r[FIRST_DATA])) for r in rows if r[FIRST_DATA] and r[LOOP_END]]
    times = [t for _, t in loops]
    mean_n, mean_t = sum(r[TILES] for r, _ in loops) / len(loops), sum(times) / len(times)
    per_tile = _least_squares([[1.0, r[TILES]] for r, _ in loops], times)
    intercept, slope = per_tile if per_tile else (float("nan"), float("nan"))
    plain_masked = _least_squares([[1.0, r[TILES] - r[MASKED], r[MASKED]] for r, _ in loops], times)
    by_sm = {}
    for r in rows:
        by_sm.setdefault(r[SM], []).append(r)
    gaps = []
    for rs in by_sm.values():
        rs.sort(key=lambda r: r[START])
        gaps += [us(b[START] - a[END]) for a, b in zip(rs, rs[1:])]
    med = statistics.median
    return dict(
        programs=len(rows), sms=len(by_sm), programs_per_sm=round(len(rows) / len(by_sm), 2),
        clocks_per_ns=round(clocks_per_ns, 3), mean_tiles=round(mean_n, 2),
        us_per_tile=round(slope, 3), loop_intercept_us=round(intercept, 3),
        loop_mean_us=round(mean_t, 3), mean_masked_tiles=round(statistics.mean(r[MASKED] for r in rows), 3),
        loop_fit_plain_masked_us=None if plain_masked is None
        else dict(zip("abc", (round(x, 3) for x in plain_masked))),
        first_tile_us=round(med(us(r[FIRST_TILE] - r[FIRST_DATA]) for r in rows if r[FIRST_TILE]), 3)
        if any(r[FIRST_TILE] for r in rows) else None,
        start_to_first_tma_us=round(med(us(r[FIRST_TMA] - r[START]) for r in rows if r[FIRST_TMA]), 3),
        start_to_first_data_us=round(med(us(r[FIRST_DATA] - r[START]) for r in rows if r[FIRST_DATA]), 3),
        epilogue_us=round(med(us(r[END] - r[LOOP_END]) for r in rows if r[LOOP_END]), 3),
        gap_to_next_program_us=round(med(gaps), 3) if gaps else None,
        program_mean_us=round(statistics.mean(us(r[END] - r[START]) for r in rows), 3),
    )


def _least_squares(rows, y):
    """Coefficients of the least-squares fit y ~ rows (one row of regressors
    per sample), None when the regressors do not vary enough to separate
    them."""
    import torch

    x = torch.tensor(rows, dtype=torch.float64)
    if len(rows) < x.shape[1] or torch.linalg.matrix_rank(x) < x.shape[1]:
        return None
    return torch.linalg.lstsq(x, torch.tensor(y, dtype=torch.float64)[:, None]).solution[:, 0].tolist()


def timeline_main(description, kernel, bench, load, compile_only, programs, extra=lambda call: {}):
    """The command line of a timeline tool: the stamped kernel (load()) run
    once per case on BENCH.md's inputs, as the op calls it (its launch
    captured from one forward + backward), its time with and without the
    stamps, and summarise's phases.  kernel: kernel_versions.KERNELS' key;
    programs(tree module, D, L, B, H, Hkv): the launch's grid size; extra(call):
    fields to add to each record."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--lengths", default="8192,16384")
    ap.add_argument("--shapes", default="24x64")
    ap.add_argument("--compile-only", action="store_true", help="patch and compile for sm_90, no GPU run")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.compile_only:
        compile_only()
        return

    import torch
    import triton
    import triton.testing

    from benchmarks.attention import paper_like_inputs
    from benchmarks.kernel_versions import KERNELS, capture, fresh
    from benchmarks.result_file import run_header, write_result
    from fox_megatron.kernels import AcpConfig, forgetting_attention

    tree, fn_name, outputs, accumulators = KERNELS[kernel]
    module = load()
    # the stamps are the per-block kernels': the persistent ones (the
    # default forward, and dK / dV at head dim 64) are neither stamped nor
    # timed here
    for m in (module, tree):
        if hasattr(m, "PERSISTENT"):
            m.PERSISTENT = False
    stamped, plain = getattr(module, fn_name), getattr(tree, fn_name)
    records = []
    for shape in args.shapes.split(","):
        H, D = (int(x) for x in shape.split("x"))
        for L in (int(x) for x in args.lengths.split(",")):
            B = max(1, 32768 // L)
            q, k, v, log_f = paper_like_inputs(B, L, H, D, seed=0)
            for acp in (False, True):
                def step():
                    cfg = AcpConfig(logit_bound=math.sqrt(D)) if acp else None
                    out = forgetting_attention(q, k, v, log_f, acp=cfg)
                    out.backward(torch.ones_like(out))

                call = capture(tree, fn_name, step)
                n = programs(tree, D, L, B, H, k.shape[2])
                buf = torch.zeros(n * SLOTS, dtype=torch.int64, device="cuda")
                module.TIMELINE["buf"] = buf
                a, _ = fresh(call, outputs, accumulators)
                ms_stamped = triton.testing.do_bench(lambda: stamped(*a), warmup=50, rep=200)
                ms_plain = triton.testing.do_bench(lambda: plain(*a), warmup=50, rep=200)
                buf.zero_()
                a, _ = fresh(call, outputs, accumulators)  # the adds of a fused pass start from zero
                stamped(*a)
                torch.cuda.synchronize()
                rec = dict(bench=bench, H=H, D=D, L=L, B=B, acp=acp, **extra(call), ms_stamped=round(ms_stamped, 4),
                           ms_plain=round(ms_plain, 4), **summarise(buf.view(n, SLOTS).cpu().tolist()))
                records.append(rec)
                print(json.dumps(rec), flush=True)
    result = run_header(records=records)
    if args.out:
        write_result(args.out, result)


def main():
    import triton

    timeline_main(__doc__.split("\n\n")[0], "fwd", "fwd_timeline", load_patched, compile_only,
                  lambda tree, D, L, B, H, Hkv: triton.cdiv(L, tree.CONFIGS[D][0]) * B * H)


if __name__ == "__main__":
    main()
