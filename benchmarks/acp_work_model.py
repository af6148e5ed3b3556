"""Where ACP's time goes: a linear work model fitted to measured kernel times.

Each attention kernel's time is modelled as

    t = a * programs + b * plain_tiles + c * masked_tiles

(programs: launched programs that do any work; plain tiles: tiles without a
mask; masked tiles: tiles with the causal and / or the ACP element mask).
The counts come from the tile rules of the kernels that the profiles
timed, evaluated here in torch on BENCH.md's paper-like gates; the times
from committed per-kernel GPU profiles of that kernel code (dense and ACP,
several lengths).  Those kernels masked the pruned pairs of ACP's kept
tiles element by element (the ACP masks counted below); the current ones
compute kept tiles whole, so only the diagonal tiles are masked.  The fit says what a
program's fixed work and a masked tile cost in plain-tile units, and from
that how far ACP's translation efficiency E can go without changing them.

Runs on CPU:

    python benchmarks/acp_work_model.py --out benchmarks/results/acp_work_model_masked_loops_h200.json
    python benchmarks/acp_work_model.py --profiles three_loops --out benchmarks/results/acp_work_model_h200.json
    python benchmarks/acp_work_model.py --profiles gluon_dispatch --out benchmarks/results/acp_work_model_gluon_h200.json

The gluon_dispatch set fits the Hopper kernels that run by default now
(gluon_bwd.DISPATCH): the Gluon forward (128 x 128 tiles), the Gluon
dK / dV kernel (64-query tiles over 128-key blocks; at head dim 128 it also
does the dQ pass's work, so there is no dQ kernel to fit) and at head dim
64 the Triton dQ kernel.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from attention import paper_like_log_gates  # noqa: E402

from fox_megatron.kernels.forgetting_attn import gluon_bwd, gluon_fwd  # noqa: E402
from fox_megatron.kernels.forgetting_attn.triton_ops import kernel_config  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# kernel kind -> its name in the profiles, for the Triton kernels and for
# the Hopper kernels that gluon_bwd.DISPATCH runs
KERNELS = {"fwd": "_fwd_kernel", "dkdv": "_dkdv_kernel", "dq": "_dq_kernel"}
GLUON_KERNELS = {"fwd": "_fwd_kernel_sm90_pingpong", "dkdv": "_dkdv_kernel_sm90", "dq": "_dq_kernel"}


def triton_blocks(kind, D):
    return kernel_config(kind, D)[:2]


def gluon_blocks(kind, D):
    # the dQ kernel is Triton's
    configs = {"fwd": gluon_fwd.CONFIGS, "dkdv": gluon_bwd.CONFIGS}.get(kind)
    return tuple(configs[D][:2]) if configs else triton_blocks(kind, D)

# per-kernel profiles, one set per kernel code: file, profile key path, L,
# documents per row
PROFILE_SETS = {
    # one masked loop for ACP's partial and the diagonal tiles (443aa4f)
    "masked_loops": [
        ("profile_attention_16384_masked_loops_h200.json", ("profiles",), 16384, 1),
        ("profile_attention_8192_masked_loops_h200.json", ("profiles",), 8192, 1),
        ("profile_attention_4096_masked_loops_h200.json", ("profiles",), 4096, 8),
    ],
    # a loop per tile range (e08654c = 7dac155 for the attention kernels; the
    # default path's PTX did not change until 443aa4f)
    "three_loops": [
        ("attention_partial_counts_h200.json", ("profiles_16k", "profiles"), 16384, 1),
        ("tune_attention_d128_h200.json", ("profiles",), 8192, 1),
        ("profile_attention_4k_host_cached_h200.json", ("profiles",), 4096, 8),
    ],
    # the Gluon forward at both head dims, the Gluon dK / dV kernel with and
    # without ACP (fused with dQ at head dim 128), af24592
    "gluon_dispatch": [
        ("profile_attention_16384_dispatch_h200.json", ("profiles",), 16384, 1),
        ("profile_attention_8192_dispatch_h200.json", ("profiles",), 8192, 1),
        ("profile_attention_4096_dispatch_h200.json", ("profiles",), 4096, 8),
    ],
}
# per set: the kernels' names in its profiles and their tile shapes
SET_KERNELS = {"masked_loops": (KERNELS, triton_blocks), "three_loops": (KERNELS, triton_blocks),
               "gluon_dispatch": (GLUON_KERNELS, gluon_blocks)}
TOKENS = 32768


def paper_like_decay(B, L, H, docs, seed):
    """c per (sequence, head): [S, H, T] float64 (documents of L / docs)."""
    log_f = paper_like_log_gates(B * docs, L // docs, H, torch.Generator().manual_seed(seed), torch.float64)
    return log_f.cumsum(1).permute(0, 2, 1)


def block_edges(c, block):
    T = c.shape[-1]
    n = -(-T // block)
    first = c[..., torch.arange(n) * block]
    last = c[..., torch.clamp((torch.arange(n) + 1) * block, max=T) - 1]
    return first, last


def tile_counts(kind, c, thr, bm, bn, acp):
    """(programs, plain tiles, masked tiles) of one kernel over all (sequence,
    head) pairs, by the kernel's ranges (causal self-attention)."""
    S, H, T = c.shape
    M, N = -(-T // bm), -(-T // bn)
    qf, ql = block_edges(c, bm)  # S H M
    kf, kl = block_edges(c, bn)  # S H N
    t = thr[:, :, None, None]
    pruned = (qf[..., :, None] - kl[..., None, :]) < t  # largest decay below thr: S H M N
    partial = (ql[..., :, None] - kf[..., None, :]) < t  # smallest decay below thr
    m = torch.arange(M)
    n = torch.arange(N)
    if kind in ("fwd", "dq"):
        hi = (torch.clamp((m + 1) * bm, max=T) - 1) // bn + 1  # M
        mid = (m * bm) // bn
        if acp:
            lo = torch.minimum(pruned.sum(-1), hi)  # S H M
            part = partial.sum(-1)
            full_lo = torch.maximum(torch.minimum(part, mid), lo)
            mid2 = torch.maximum(mid.expand_as(lo), lo)
            acp_masked = (torch.minimum(full_lo, mid2) - lo).clamp_min(0)
            plain = (mid2 - torch.maximum(full_lo, lo)).clamp_min(0)
            diag = hi - mid2
        else:
            acp_masked = torch.zeros(S, H, M, dtype=torch.long)
            plain = mid.expand(S, H, M)
            diag = (hi - mid).expand(S, H, M)
        work = acp_masked + plain + diag
    else:  # dkdv: one program per key block, looping over query blocks
        lo = ((n * bn) // bm).expand(S, H, N)
        full_lo = torch.clamp(-(-((n + 1) * bn) // bm), max=M).expand(S, H, N)
        if acp:
            hi = torch.maximum((~pruned).sum(-2), lo)  # kept query blocks, at least the diagonal
            full_q = (~partial).sum(-2)
            part_lo = torch.minimum(torch.maximum(full_q, full_lo), hi)
        else:
            hi = torch.full_like(lo, M)
            part_lo = hi
        mid = torch.minimum(full_lo, hi)
        diag = (mid - lo).clamp_min(0)
        plain = (torch.maximum(part_lo, mid) - mid).clamp_min(0)
        acp_masked = (hi - torch.maximum(part_lo, mid)).clamp_min(0)
        work = diag + plain + acp_masked
    programs = int((work > 0).sum())
    return programs, int(plain.sum()), int((acp_masked + diag).sum())


def counts_for(H, D, L, docs, acp, seed=1, blocks=triton_blocks, kinds=tuple(KERNELS)):
    B = max(TOKENS // L, 1)
    c = paper_like_decay(B, L, H, docs, seed)
    T = c.shape[-1]
    # QK-norm with unit weights: U = sqrt(D); N = the document's length
    thr = torch.full(c.shape[:2], -2 * math.sqrt(D) - math.log(T) - 10.0, dtype=torch.float64)
    return {kind: tile_counts(kind, c, thr, *blocks(kind, D), acp) for kind in kinds}


def load_profiles(profiles, names=KERNELS):
    """One row per profiled case; ms holds the kinds whose kernel ran."""
    rows = []
    for fname, path, L, docs in profiles:
        data = json.load(open(os.path.join(RESULTS, fname)))
        for p in path:
            data = data[p]
        for label, prof in data.items():
            shape, case = label.split("_", 1)
            H, D = (int(x) for x in shape.split("x"))
            acp = case.endswith("acp")
            ms = {k["kernel"]: k["ms"] for k in prof["kernels"]}
            rows.append(dict(file=fname, H=H, D=D, L=L, docs=docs, acp=acp,
                             ms={kind: ms[name] for kind, name in names.items() if name in ms}))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--profiles", choices=sorted(PROFILE_SETS), default="masked_loops",
                    help="which kernel code's profiles to fit (the Triton kernels' latest: masked_loops; "
                         "the kernels that run by default on Hopper: gluon_dispatch)")
    args = ap.parse_args()
    profiles = PROFILE_SETS[args.profiles]
    names, blocks = SET_KERNELS[args.profiles]
    rows = load_profiles(profiles, names)
    for r in rows:
        r["counts"] = counts_for(r["H"], r["D"], r["L"], r["docs"], r["acp"], blocks=blocks, kinds=tuple(r["ms"]))
    fits, skipped = {}, {}
    for H, D in sorted({(r["H"], r["D"]) for r in rows}):
        mine = [r for r in rows if (r["H"], r["D"]) == (H, D)]
        if len({(r["L"], r["docs"]) for r in mine}) < 3:
            # three unknowns per kernel: dense and ACP at two workloads leave
            # the fit nearly undetermined
            skipped[f"{H}x{D}"] = f"profiles at {len(mine)} cases only; needs three workloads (e.g. 8k as well)"
            continue
        for kind in [k for k in KERNELS if all(k in r["ms"] for r in mine)]:
            X = torch.tensor([r["counts"][kind] for r in mine], dtype=torch.float64)
            y = torch.tensor([r["ms"][kind] for r in mine], dtype=torch.float64)
            coef = torch.linalg.lstsq(X, y[:, None]).solution[:, 0]
            a, b, c = (float(v) for v in coef)
            # how well the cases separate the three costs: the condition
            # number of the counts with unit-norm columns (the benchmark
            # keeps B * L fixed, so the program count hardly varies and
            # acts as an intercept)
            cond = float(torch.linalg.cond(X / X.norm(dim=0, keepdim=True)))
            pred = (X @ coef).tolist()
            # E = (1 - t_acp / t_full) / (1 - kept) at each single-document
            # length, by the model, and by the model without a program's
            # fixed work or with masked tiles as cheap as plain ones
            e = {}
            for L in sorted({r["L"] for r in mine if r["docs"] == 1}):
                full = next(r["counts"][kind] for r in mine if (r["L"], r["docs"], r["acp"]) == (L, 1, False))
                acpc = next(r["counts"][kind] for r in mine if (r["L"], r["docs"], r["acp"]) == (L, 1, True))
                kept = (acpc[1] + acpc[2]) / (full[1] + full[2])

                def eff(w):
                    t = lambda n: w[0] * n[0] + w[1] * n[1] + w[2] * n[2]  # noqa: E731
                    return round((1 - t(acpc) / t(full)) / (1 - kept), 3)
                e[str(L)] = dict(kept_tiles=round(kept, 4), model=eff((a, b, c)), no_program_cost=eff((0.0, b, c)),
                                 masks_free=eff((a, b, b)))
            fits[f"{H}x{D}_{kind}"] = dict(
                us_per_program=a * 1e3, us_per_plain_tile=b * 1e3, us_per_masked_tile=c * 1e3,
                program_in_tiles=a / b, masked_tile_in_tiles=c / b, condition=round(cond, 1),
                trustworthy=bool(min(a, b, c) > 0), efficiency=e,
                cases=[dict(L=r["L"], docs=r["docs"], acp=r["acp"], counts=r["counts"][kind],
                            ms=r["ms"][kind], model_ms=round(p, 4)) for r, p in zip(mine, pred)])
    print(f"{'kernel':>12} {'program':>8} {'masked':>7} {'max err':>8} {'cond':>6}   "
          "E by the model (no program cost, free masks)")
    for name, f in fits.items():
        err = max(abs(cse["model_ms"] - cse["ms"]) / cse["ms"] for cse in f["cases"])
        es = "  ".join(f"{L}: {v['model']:.2f} ({v['no_program_cost']:.2f}, {v['masks_free']:.2f})"
                       for L, v in f["efficiency"].items())
        flag = "" if f["trustworthy"] else "   (a cost <= 0: the cases do not separate the costs)"
        print(f"{name:>12} {f['program_in_tiles']:8.2f} {f['masked_tile_in_tiles']:7.2f} {err:8.1%} "
              f"{f['condition']:6.1f}   {es}{flag}")
    for shape, why in skipped.items():
        print(f"{shape}: not fitted ({why})")
    if args.out:
        with open(args.out, "w") as fh:
            gpus = sorted({json.load(open(os.path.join(RESULTS, p[0])))["gpu"] for p in profiles})
            json.dump(dict(gpu=", ".join(gpus), torch=torch.__version__, date=datetime.date.today().isoformat(),
                           command="python " + " ".join(sys.argv),
                           model="t = a * programs + b * plain_tiles + c * masked_tiles, least squares per kernel",
                           tiles={kind: {D: list(blocks(kind, D)) for D in (64, 128)} for kind in KERNELS},
                           inputs=[p[0] for p in profiles], fits=fits, not_fitted=skipped), fh, indent=1)


if __name__ == "__main__":
    main()
