"""A/B of a Gluon kernel against the Triton kernel it replaces, in one process.

    python benchmarks/kernel_ab.py --switch USE_GLUON_DKDV --out benchmarks/results/<name>.json
    python benchmarks/kernel_ab.py --switch USE_GLUON_FUSED_DQ --dispatch 128=fused,fused --lengths 2048,8192

Switches a ``triton_ops`` flag (USE_GLUON_FWD, USE_GLUON_DKDV, USE_GLUON_FUSED_DQ) on and off in
interleaved rounds on BENCH.md's inputs (paper-like gates, B = 32768 / L)
and reports, per shape and length, the median fwd + bwd step (as
benchmarks/attention.py times it) and the median backward alone (the
kernels' ``_backward`` on the forward's saved tensors). ``--cfgs`` sweeps
the Gluon kernel's (BLOCK_M, BLOCK_N, warps, STAGES); the first is the one
checked, at each head dim of ``--shapes``.  ``--dispatch`` overrides rows of
gluon_bwd.DISPATCH for the run (the second line above times the fused dQ
without ACP too).  The checks compare both paths' outputs and
gradients with each other and with the float64 reference (random inputs:
GQA, the [T, B] layout, packed documents, odd and unit lengths).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import triton
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.attention import TOKENS, log_gates, paper_like_inputs, time_step  # noqa: E402
from benchmarks.result_file import run_header, write_result  # noqa: E402
from fox_megatron.kernels import AcpConfig, forgetting_attention  # noqa: E402
from fox_megatron.kernels.forgetting_attn import gluon_bwd, gluon_fwd, triton_ops  # noqa: E402

MODULES = {"USE_GLUON_FWD": gluon_fwd, "USE_GLUON_DKDV": gluon_bwd, "USE_GLUON_FUSED_DQ": gluon_bwd}


def set_cfg(module, D, cfg):
    """cfg: the module's CONFIGS entry, optionally followed by the launch's
    registers a thread (MAXNREG)."""
    module.CONFIGS[D] = tuple(cfg[:4])
    if len(cfg) > 4:
        module.MAXNREG = cfg[4]


def backward_timer(q, k, v, log_f, acp):
    """The kernels' backward on one forward's saved tensors (autograd and
    the gate's scan left out), as a do_bench-able closure."""
    out = forgetting_attention(q, k, v, log_f, acp=acp)
    do = torch.randn_like(out)
    node = out.grad_fn
    saved = node.saved_tensors  # q, k, v, out, lse, c, thr, kblo, qbhi
    q_, k_, v_, o_, lse, c, thr, kblo, qbhi = saved
    pairs = triton_ops._PairTable.self_attention(node.seqs)

    def bwd():
        triton_ops._backward(do, q_, k_, v_, c, c, o_, lse, pairs, node.scale, thr, True, kblo, qbhi=qbhi,
                             allow_gluon=True)

    return bwd


def max_rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def checks(switch, D):
    cases = [
        dict(B=2, L=1531, Hq=4, Hkv=2, layout="bshd", docs=False),
        dict(B=2, L=1531, Hq=4, Hkv=2, layout="sbhd", docs=False),
        dict(B=2, L=1531, Hq=4, Hkv=4, layout="bshd", docs=True),
        dict(B=1, L=77, Hq=2, Hkv=1, layout="bshd", docs=False),
        dict(B=3, L=1, Hq=2, Hkv=2, layout="bshd", docs=False),
        dict(B=1, L=4096, Hq=8, Hkv=8, layout="bshd", docs=False),
    ]
    rows = []
    for case in cases:
        B, L, Hq, Hkv = case["B"], case["L"], case["Hq"], case["Hkv"]
        g = torch.Generator(device="cpu").manual_seed(B * 1000 + L)
        shape = (lambda h: (B, L, h, D)) if case["layout"] == "bshd" else (lambda h: (L, B, h, D))
        q = torch.randn(shape(Hq), generator=g).cuda().bfloat16().requires_grad_()
        k = torch.randn(shape(Hkv), generator=g).cuda().bfloat16().requires_grad_()
        v = torch.randn(shape(Hkv), generator=g).cuda().bfloat16().requires_grad_()
        rates = torch.logspace(-3, 0, Hq)
        gshape = (B, L, Hq) if case["layout"] == "bshd" else (L, B, Hq)
        log_f = log_gates(rates, torch.randn(gshape, generator=g)).cuda().requires_grad_()
        do = torch.randn_like(q)
        cu = None
        if case["docs"]:
            cu = torch.tensor([0, 300, 301, L, L + 469, 2 * L], dtype=torch.int32, device="cuda")
        for acp in (False, True):
            kw = dict(layout=case["layout"], cu_seqlens=cu, acp=AcpConfig() if acp else None)
            res = {}
            for use in (True, False):
                setattr(triton_ops, switch, use)
                o = forgetting_attention(q, k, v, log_f, **kw)
                res[use] = (o, *torch.autograd.grad(o, (q, k, v, log_f), do))
            setattr(triton_ops, switch, False)
            cast = [t.detach().double().requires_grad_() for t in (q, k, v, log_f)]
            o = forgetting_attention(*cast, backend="torch", **kw)
            ref = (o, *torch.autograd.grad(o, cast, do.double()))
            names = ("out", "dq", "dk", "dv", "dlog_f")
            rows.append(dict(case, D=D, acp=acp,
                             diff={n: round(max_rel(a, b), 5) for n, a, b in zip(names, res[True], res[False])},
                             vs_fp64_on={n: round(max_rel(a, r), 5) for n, a, r in zip(names, res[True], ref)},
                             vs_fp64_off={n: round(max_rel(a, r), 5) for n, a, r in zip(names, res[False], ref)}))
            print("check", rows[-1], flush=True)
    return rows


def parse_dispatch(text):
    """'D=WITHOUT_ACP,WITH_ACP;...' -> {D: (mode, mode)} for gluon_bwd.DISPATCH."""
    modes = {"none": None, "dkdv": "dkdv", "fused": "fused"}
    table = {}
    for item in text.split(";"):
        d, _, pair = item.partition("=")
        parts = pair.split(",")
        if not d.strip().isdigit() or len(parts) != 2 or any(p.strip() not in modes for p in parts):
            raise SystemExit(f"--dispatch: expected 'D=MODE,MODE' with modes {sorted(modes)}, got {item!r}")
        table[int(d)] = tuple(modes[p.strip()] for p in parts)
    return table


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--switch", default="USE_GLUON_DKDV", choices=sorted(MODULES))
    ap.add_argument("--lengths", default="8192,16384")
    ap.add_argument("--shapes", default="16x128")
    ap.add_argument("--cfgs", default=None,
                    help="Gluon configurations 'BM,BN,W,ST[,MAXNREG];...' (default: the module's)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup-ms", type=float, default=100)
    ap.add_argument("--rep-ms", type=float, default=500)
    ap.add_argument("--dispatch", default=None,
                    help="gluon_bwd.DISPATCH entries for this run, 'D=WITHOUT_ACP,WITH_ACP;...' with 'none', "
                         "'dkdv' or 'fused' (e.g. '128=fused,fused' to time the fused dQ without ACP too)")
    ap.add_argument("--gate-rate", type=float, default=None,
                    help="one decay rate r for every head (log f = -r exp(0.5 z), z ~ N(0, 1)) instead of the "
                         "paper-like spread; e.g. 0.17 keeps a few percent of the tiles at 16k, as early in training")
    ap.add_argument("--no-checks", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    module = MODULES[args.switch]
    if args.dispatch:
        gluon_bwd.DISPATCH.update(parse_dispatch(args.dispatch))
    cfgs = [tuple(int(x) for x in c.split(",")) for c in args.cfgs.split(";")] if args.cfgs else [None]
    result = run_header(gpus=1, records=[])
    default_cfg = dict(module.CONFIGS)
    default_nreg = module.MAXNREG

    def restore():
        module.CONFIGS.clear()
        module.CONFIGS.update(default_cfg)
        module.MAXNREG = default_nreg

    if not args.no_checks:
        result["checks"] = []
        for D in sorted({int(shape.split("x")[1]) for shape in args.shapes.split(",")}):
            if cfgs[0] is not None:
                set_cfg(module, D, cfgs[0])
            result["checks"] += checks(args.switch, D)
            restore()
    for shape in args.shapes.split(","):
        H, D = (int(x) for x in shape.split("x"))
        for L in (int(x) for x in args.lengths.split(",")):
            B = TOKENS // L
            q, k, v, log_f = paper_like_inputs(B, L, H, D, seed=L + H)
            if args.gate_rate is not None:
                gen = torch.Generator(log_f.device).manual_seed(L)
                z = torch.randn(log_f.shape, device=log_f.device, generator=gen)
                log_f = log_gates(args.gate_rate, z).requires_grad_()
            for acp in (None, AcpConfig()):
                for cfg in cfgs:
                    if cfg is not None:
                        set_cfg(module, D, cfg)
                    times = {"step": {True: [], False: []}, "bwd": {True: [], False: []}}
                    for _ in range(args.rounds):
                        for use in (True, False):
                            setattr(triton_ops, args.switch, use)
                            times["step"][use].append(time_step(lambda: forgetting_attention(q, k, v, log_f, acp=acp),
                                                                (q, k, v, log_f), args.warmup_ms, args.rep_ms))
                            bwd = backward_timer(q, k, v, log_f, acp)
                            times["bwd"][use].append(triton.testing.do_bench(bwd, warmup=args.warmup_ms,
                                                                             rep=args.rep_ms, return_mode="median"))
                    setattr(triton_ops, args.switch, False)
                    med = {kind: {use: statistics.median(v) for use, v in d.items()} for kind, d in times.items()}
                    rec = dict(bench="kernel_ab", switch=args.switch, H=H, D=D, L=L, B=B, acp=acp is not None,
                               gluon_cfg=list(cfg or module.CONFIGS[D]), maxnreg=module.MAXNREG,
                               dispatch=list(gluon_bwd.DISPATCH.get(D, (None, None))),
                               step_ms_gluon=round(med["step"][True], 4), step_ms_triton=round(med["step"][False], 4),
                               bwd_ms_gluon=round(med["bwd"][True], 4), bwd_ms_triton=round(med["bwd"][False], 4),
                               rounds={k: {str(u): v for u, v in d.items()} for k, d in times.items()})
                    if args.gate_rate is not None:
                        rec["gate_rate"] = args.gate_rate
                    if acp is not None:
                        with torch.no_grad():
                            rec["kept_tiles"] = round(forgetting_attention(q, k, v, log_f, acp=acp,
                                                                           return_stats=True)[1].kept_fraction, 4)
                    result["records"].append(rec)
                    print(f"H={H} D={D} L={L} acp={acp is not None} cfg={rec['gluon_cfg']} "
                          f"step {rec['step_ms_gluon']:.3f} vs {rec['step_ms_triton']:.3f}  "
                          f"bwd {rec['bwd_ms_gluon']:.3f} vs {rec['bwd_ms_triton']:.3f}", flush=True)
                    restore()
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()
