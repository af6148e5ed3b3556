"""Tile-shape sweep and kernel-time profile for the forgetting attention kernels.

Times the forward and the backward separately for each candidate
(BLOCK_M, BLOCK_N, num_warps, num_stages) of each kernel, on BENCH.md's
paper-like inputs, and prints a per-kernel CUDA time profile of one
fwd + bwd step (ACP off / on / packed documents).  The chosen shapes go into
kernels/forgetting_attn/triton_ops.py:CONFIGS.

    python benchmarks/tune_attention.py --L 16384 --out results.json

``--ab dq=64,128,4,3`` instead times the fwd + bwd step (benchmarks/
attention.py's inputs and timing) with one kernel's current shapes and with
the given ones, in interleaved rounds, for the four FoX variants (one
document or 8 per row, ACP off / on) at each of ``--lengths``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import triton
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from attention import TOKENS, doc_cu_seqlens, paper_like_inputs, time_step  # noqa: E402

from fox_megatron.kernels import AcpConfig, forgetting_attention  # noqa: E402
from benchmarks.result_file import run_header, write_result  # noqa: E402
from fox_megatron.kernels.forgetting_attn import triton_ops  # noqa: E402

CANDIDATES = {
    "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3),
            (128, 64, 4, 4), (128, 32, 4, 3), (64, 128, 4, 3)],
    "dkdv": [(32, 128, 4, 3), (32, 128, 4, 5), (64, 128, 8, 3), (64, 128, 4, 3), (64, 64, 4, 3),
             (32, 64, 4, 3), (64, 128, 8, 2), (128, 128, 8, 2)],
    "dq": [(128, 64, 4, 2), (128, 64, 8, 2), (128, 32, 4, 3), (128, 64, 4, 3), (64, 64, 4, 3),
           (128, 128, 8, 2), (64, 32, 4, 3), (128, 128, 4, 2), (128, 128, 4, 3), (128, 128, 8, 3),
           (64, 128, 4, 3)],
}


def bench_parts(q, k, v, log_f, acp, cu=None, rep=300):
    """(forward ms, backward ms) of one call."""
    with torch.no_grad():
        fwd = triton.testing.do_bench(lambda: forgetting_attention(q, k, v, log_f, acp=acp, cu_seqlens=cu),
                                      warmup=50, rep=rep, return_mode="median")
    out = forgetting_attention(q, k, v, log_f, acp=acp, cu_seqlens=cu)
    do = torch.randn_like(out)
    bwd = triton.testing.do_bench(lambda: torch.autograd.grad(out, (q, k, v, log_f), do, retain_graph=True),
                                  warmup=50, rep=rep, return_mode="median")
    return fwd, bwd


def profile(q, k, v, log_f, acp, cu, label):
    """GPU time per kernel of one fwd + bwd step, next to the step's wall
    time: a wall time above the kernels' sum is the GPU waiting for the host."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    max_len = q.shape[1] // 8 if cu is not None else None
    out = forgetting_attention(q, k, v, log_f, acp=acp, cu_seqlens=cu, max_seqlen=max_len)
    do = torch.randn_like(out)

    def step():
        for t in (q, k, v, log_f):
            t.grad = None
        forgetting_attention(q, k, v, log_f, acp=acp, cu_seqlens=cu, max_seqlen=max_len).backward(do)

    wall = triton.testing.do_bench(step, warmup=50, rep=300, return_mode="median")
    # the host's time per step alone: queue steps without waiting for them
    # (a step whose wall time is about this is bound by the host)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        step()
    enqueue = (time.perf_counter() - t0) / 20 * 1e3
    torch.cuda.synchronize()
    with tprofile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0 and e.device_type.name == "CUDA":
            rows.append((t / 3e3, e.count // 3, e.key[:70]))
    gpu = sum(r[0] for r in rows)
    # the host's side: operators by their own CPU time (a step bound by the
    # host spends its wall time here)
    host = [(e.self_cpu_time_total / 3e3, e.count // 3, e.key[:70]) for e in prof.key_averages()
            if e.self_cpu_time_total > 0]
    host_ms = sum(r[0] for r in host)
    print(f"--- profile {label}: wall {wall:.3f} ms per step, GPU kernels {gpu:.3f} ms, "
          f"host enqueue {enqueue:.3f} ms, host (profiled) {host_ms:.3f} ms")
    for t, n, key in sorted(rows, reverse=True)[:12]:
        print(f"{t:9.3f} ms  x{n:<3} {key}")
    print("  host:")
    for t, n, key in sorted(host, reverse=True)[:15]:
        print(f"{t:9.3f} ms  x{n:<3} {key}")
    return dict(wall_ms=round(wall, 4), gpu_ms=round(gpu, 4), host_enqueue_ms=round(enqueue, 4),
                host_profiled_ms=round(host_ms, 4),
                kernels=[dict(ms=round(t, 4), count=n, kernel=key) for t, n, key in sorted(rows, reverse=True)[:12]],
                host_ops=[dict(ms=round(t, 4), count=n, op=key) for t, n, key in sorted(host, reverse=True)[:15]])


def ab(kind, cfg, shapes, lengths, rounds):
    """Records of the step's median ms with CONFIGS[kind] as it is ("base")
    and as cfg ("candidate"), rounds interleaved, and the largest difference
    between the two configurations' gradients."""
    records = []
    for shape in shapes:
        H, D = (int(x) for x in shape.split("x"))
        key = triton_ops.config_key(D)
        configs = {"base": triton_ops.CONFIGS[kind][key], "candidate": cfg}
        for L in lengths:
            B = max(TOKENS // L, 1)
            q, k, v, log_f = paper_like_inputs(B, L, H, D, seed=L + H)
            acp = AcpConfig(log_eps=-10.0, logit_bound=math.sqrt(D))
            for docs in (1, 8):
                cu = doc_cu_seqlens(B, L, docs, q.device) if docs > 1 else None
                mx = L // docs if cu is not None else None
                for use_acp in (False, True):
                    fn = lambda: forgetting_attention(q, k, v, log_f, cu_seqlens=cu, max_seqlen=mx,  # noqa: E731
                                                      acp=acp if use_acp else None)
                    times = {name: [] for name in configs}
                    grads = {}
                    for _ in range(rounds):
                        for name, c in configs.items():
                            triton_ops.CONFIGS[kind][key] = c
                            times[name].append(time_step(fn, (q, k, v, log_f), 100, 500))
                            grads[name] = torch.autograd.grad(fn(), (q, k, v, log_f), torch.ones_like(q))
                    triton_ops.CONFIGS[kind][key] = configs["base"]
                    diff = max((a.float() - b.float()).abs().max().item()
                               for a, b in zip(grads["base"], grads["candidate"]))
                    med = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
                    rec = dict(bench="tune_ab", kind=kind, H=H, D=D, L=L, B=B, docs=docs, acp=use_acp,
                               base_cfg=configs["base"], candidate_cfg=cfg, ms_base=round(med["base"], 4),
                               ms_candidate=round(med["candidate"], 4),
                               change=round(med["candidate"] / med["base"] - 1, 4), max_abs_grad_diff=diff,
                               rounds={n: [round(x, 4) for x in t] for n, t in times.items()})
                    records.append(rec)
                    print(json.dumps(rec), flush=True)
            del q, k, v, log_f
            torch.cuda.empty_cache()
    return records


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--L", type=int, default=16384)
    ap.add_argument("--shapes", default="24x64,16x128")
    ap.add_argument("--kinds", default="fwd,dkdv,dq")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--profile-only", action="store_true", help="profile the chosen shapes, no sweep")
    ap.add_argument("--labels", default="dense,acp,docs8,docs8_acp", help="which cases to profile")
    ap.add_argument("--ab", default=None, metavar="KIND=BM,BN,WARPS,STAGES",
                    help="time the step with KIND's current shapes against these, no sweep")
    ap.add_argument("--lengths", default="8192,16384", help="with --ab")
    ap.add_argument("--rounds", type=int, default=3, help="with --ab")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results = run_header(sweeps=[], profiles={})
    if args.ab:
        kind, cfg = args.ab.split("=")
        results["records"] = ab(kind, tuple(int(x) for x in cfg.split(",")), args.shapes.split(","),
                                [int(x) for x in args.lengths.split(",")], args.rounds)
        if args.out:
            write_result(args.out, results)
        return
    for shape in args.shapes.split(","):
        H, D = (int(x) for x in shape.split("x"))
        L = args.L
        B = max(32768 // L, 1)
        q, k, v, log_f = paper_like_inputs(B, L, H, D, seed=1)
        acp = AcpConfig(logit_bound=math.sqrt(D))
        key = triton_ops.config_key(D)
        if not args.no_profile:
            cu = doc_cu_seqlens(B, L, 8, q.device)
            for label, a, c in (("dense", None, None), ("acp", acp, None), ("docs8", None, cu),
                                ("docs8_acp", acp, cu)):
                if label not in args.labels.split(","):
                    continue
                results["profiles"][f"{H}x{D}_{label}"] = profile(q, k, v, log_f, a, c, f"H={H} D={D} {label}")
        for kind in ([] if args.profile_only else args.kinds.split(",")):
            default = triton_ops.CONFIGS[kind][key]
            best = None
            for cfg in CANDIDATES[kind]:
                triton_ops.CONFIGS[kind][key] = cfg
                try:
                    f0, b0 = bench_parts(q, k, v, log_f, None)
                    f1, b1 = bench_parts(q, k, v, log_f, acp)
                except Exception as e:  # shapes that do not fit are skipped
                    print(f"{kind} {cfg}: failed ({type(e).__name__}: {str(e)[:80]})", flush=True)
                    continue
                t = (f0 if kind == "fwd" else b0)
                t_acp = (f1 if kind == "fwd" else b1)
                row = dict(H=H, D=D, L=L, kind=kind, cfg=cfg, fwd_ms=round(f0, 3), bwd_ms=round(b0, 3),
                           fwd_acp_ms=round(f1, 3), bwd_acp_ms=round(b1, 3))
                results["sweeps"].append(row)
                print(json.dumps(row), flush=True)
                if best is None or t + t_acp < best[0]:
                    best = (t + t_acp, cfg)
            triton_ops.CONFIGS[kind][key] = best[1] if best else default
            print(f"best {kind} for D={D}: {triton_ops.CONFIGS[kind][key]}", flush=True)
        del q, k, v, log_f
        torch.cuda.empty_cache()
    results["chosen"] = {k: {str(d): c for d, c in v.items()} for k, v in triton_ops.CONFIGS.items()}
    print("chosen:", json.dumps(results["chosen"]))
    if args.out:
        write_result(args.out, results)


if __name__ == "__main__":
    main()
