"""Where ACP's translation efficiency goes: per-kernel times under gates built to separate the causes.

E = (1 - t_acp / t_full) / (1 - kept_tiles) (BENCH.md) falls short of 1
when a pruned step keeps more time than tiles.  The work model
(acp_work_model.py) fits per-program, per-tile and per-masked-tile costs
to paper-like runs, but cannot tell a cost that only ACP's code pays from a
masked tile's.  This probe times one fwd + bwd step per kernel (torch
profiler, as tune_attention.py does) on gates that isolate them:

- ``paper``: BENCH.md's paper-like gates (head h decays at rate r_h,
  log-uniform over [1e-4, 1]), with and without ACP;
- ``nothing_pruned``: the same gates scaled by 1e-6 with ACP on: every
  tile is kept, so each kernel runs ACP's code (boundary loads, partial
  ranges, threshold compare) over exactly the dense tiles; its time over
  the dense time is what ACP costs before it prunes anything;
- ``uniform``: one rate for every head, chosen (bisection on the kept
  fraction) to keep about as many tiles as ``paper``: the same work,
  spread evenly over the programs instead of over a few heavy heads;
- ``reversed``: ``paper`` with the heads in the opposite order, so that
  the grid (heads outermost) starts with the lightest programs;
- ``fast``: one fast rate for every head (``--fast-rate``, 0.17 by
  default: a few percent of the tiles kept at 16k, as in early training),
  where the step is short and the host's time per call shows.  Each
  profile also reports the host's enqueue time per step (tune_attention).

Per kernel and case it reports the ACP time over the dense time next to
the kept fraction; with no overheads the two would be equal.

    python benchmarks/acp_probe.py --L 8192 --shapes 24x64,16x128 --out results.json
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from attention import log_gates, paper_like_inputs  # noqa: E402
from tune_attention import profile  # noqa: E402

from benchmarks.result_file import run_header, write_result  # noqa: E402

from fox_megatron.kernels import AcpConfig, forgetting_attention  # noqa: E402

CASES = ("paper", "nothing_pruned", "uniform", "reversed", "fast")


def kept_fraction(q, k, v, log_f, acp):
    with torch.no_grad():
        _, st = forgetting_attention(q, k, v, log_f, acp=acp, return_stats=True)
    return st.kept_fraction


def uniform_gates(log_f, target, q, k, v, acp, iters=30):
    """Gates with one decay rate for every head (the same noise as log_f's
    first head, per token) whose kept fraction is about ``target``."""
    noise = log_f[..., :1] / log_f[..., :1].mean()  # mean 1, per token
    lo, hi = math.log(1e-6), math.log(10.0)  # log rate: larger rate, fewer tiles
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        g = (-noise * math.exp(mid)).expand_as(log_f).contiguous()
        if kept_fraction(q, k, v, g, acp) > target:
            lo = mid
        else:
            hi = mid
    return (-noise * math.exp(0.5 * (lo + hi))).expand_as(log_f).contiguous()


def kernel_times(prof):
    """{kernel name: ms per step} of a tune_attention.profile result."""
    return {r["kernel"]: r["ms"] for r in prof["kernels"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--L", type=int, default=8192)
    ap.add_argument("--shapes", default="24x64,16x128")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--fast-rate", type=float, default=0.17)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cases = args.cases.split(",")
    bad = set(cases) - set(CASES)
    if bad:
        raise SystemExit(f"unknown cases {sorted(bad)}; choose from {CASES}")
    torch.manual_seed(0)
    results = run_header(L=args.L, shapes={})
    for shape in args.shapes.split(","):
        H, D = (int(x) for x in shape.split("x"))
        B = max(32768 // args.L, 1)
        q, k, v, log_f = paper_like_inputs(B, args.L, H, D, seed=1)
        acp = AcpConfig(logit_bound=math.sqrt(D))
        dense = profile(q, k, v, log_f, None, None, f"H={H} D={D} dense")
        dense_k = kernel_times(dense)
        paper_kept = kept_fraction(q, k, v, log_f, acp)
        gates = {"paper": log_f.detach(), "nothing_pruned": log_f.detach() * 1e-6,
                 "reversed": log_f.detach().flip(-1).contiguous(),
                 "fast": log_gates(args.fast_rate, torch.randn_like(log_f.detach()))}
        if "uniform" in cases:
            gates["uniform"] = uniform_gates(log_f.detach(), paper_kept, q, k, v, acp)
        rows = dict(dense=dict(wall_ms=dense["wall_ms"], gpu_ms=dense["gpu_ms"],
                               host_enqueue_ms=dense["host_enqueue_ms"], kernels=dense_k))
        for case in cases:
            g = gates[case].clone().requires_grad_()
            kept = kept_fraction(q, k, v, g, acp)
            p = profile(q, k, v, g, acp, None, f"H={H} D={D} {case} (kept {kept:.4f})")
            ks = kernel_times(p)
            ratios = {name: round(ms / dense_k[name], 4) for name, ms in ks.items() if dense_k.get(name, 0) > 0.05}
            e = (1 - p["wall_ms"] / dense["wall_ms"]) / (1 - kept) if kept < 1 else None
            rows[case] = dict(kept_tiles=round(kept, 4), wall_ms=p["wall_ms"], gpu_ms=p["gpu_ms"],
                              host_enqueue_ms=p["host_enqueue_ms"],
                              efficiency=None if e is None else round(e, 3), kernels=ks, time_over_dense=ratios)
            print(f"{shape} {case:>15}: kept {kept:.4f}, wall {p['wall_ms']:.3f} ms (dense {dense['wall_ms']:.3f})"
                  + ("" if e is None else f", E {e:.3f}"))
            for name, r in ratios.items():
                print(f"    {r:7.4f} x dense  {name}")
        results["shapes"][shape] = rows
    if args.out:
        write_result(args.out, results)


if __name__ == "__main__":
    main()
