"""A/B of the fwd + bwd step between this tree and another checkout of the project.

    git worktree add /tmp/base <rev>      # or: git archive <rev> | tar -x -C /tmp/base
    python benchmarks/tree_ab.py --base /tmp/base --base-label <rev> --shapes 24x64,16x128 \\
        --lengths 8192,16384 --rounds 2 --out benchmarks/results/<name>.json

For changes that span several files (kernel_versions.py compares one Gluon
file, kernel_ab.py one switch): each round runs one child process per tree,
alternating (this tree first in odd rounds, the base first in even ones),
with that tree's root first on PYTHONPATH.  A child times the step as
benchmarks/attention.py does (BENCH.md's inputs: paper-like gates,
QK-norm bound sqrt(D), B = 32768 / L, median of triton.testing.do_bench),
without and with ACP, and reports the output and gradients of a smaller
call (the check case) so that the parent can compare the trees' results.
A case's time is the median over rounds; ``change`` is tree / base - 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def child(args):
    import torch

    from benchmarks.attention import TOKENS, paper_like_inputs, time_step
    from fox_megatron.kernels import AcpConfig, forgetting_attention

    out = {"cases": [], "checks": []}
    for shape in args.shapes.split(","):
        H, D = (int(x) for x in shape.split("x"))
        for L in (int(x) for x in args.lengths.split(",")):
            q, k, v, log_f = paper_like_inputs(TOKENS // L, L, H, D, seed=L + H)
            for acp in (None, AcpConfig(log_eps=-10.0, logit_bound=math.sqrt(D))):
                ms = time_step(lambda: forgetting_attention(q, k, v, log_f, acp=acp), (q, k, v, log_f),
                               args.warmup_ms, args.rep_ms)
                rec = dict(H=H, D=D, L=L, B=TOKENS // L, acp=acp is not None, ms=ms)
                if acp is not None:
                    with torch.no_grad():
                        rec["kept_tiles"] = forgetting_attention(q, k, v, log_f, acp=acp,
                                                                 return_stats=True)[1].kept_fraction
                out["cases"].append(rec)
            del q, k, v, log_f
        # the check case: one 4096-token row with ACP; the parent compares the trees
        q, k, v, log_f = paper_like_inputs(1, 4096, H, D, seed=7)
        o = forgetting_attention(q, k, v, log_f, acp=AcpConfig(logit_bound=math.sqrt(D)))
        grads = torch.autograd.grad(o, (q, k, v, log_f), torch.ones_like(o))
        path = os.path.join(args.child, f"check_{H}x{D}.pt")
        torch.save([t.detach().cpu() for t in (o, *grads)], path)
        out["checks"].append(dict(H=H, D=D, path=path))
    with open(os.path.join(args.child, "times.json"), "w") as f:
        json.dump(out, f)


def run_child(tree, args, workdir):
    os.makedirs(workdir, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(tree)] + [p for p in env.get("PYTHONPATH", "").split(
        os.pathsep) if p and os.path.abspath(p) != ROOT])
    cmd = [sys.executable, os.path.join(os.path.abspath(tree), "benchmarks", "tree_ab.py"), "--child", workdir,
           "--shapes", args.shapes, "--lengths", args.lengths, "--warmup-ms", str(args.warmup_ms),
           "--rep-ms", str(args.rep_ms)]
    if not os.path.exists(cmd[1]):  # a base older than this script: run this one with the base's modules
        cmd[1] = os.path.abspath(__file__)
    subprocess.run(cmd, env=env, check=True, cwd=os.path.abspath(tree))
    with open(os.path.join(workdir, "times.json")) as f:
        return json.load(f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", help="root of the other checkout")
    ap.add_argument("--base-label", default="base")
    ap.add_argument("--tree-label", default=None, help="default: this tree's git HEAD")
    ap.add_argument("--shapes", default="24x64,16x128")
    ap.add_argument("--lengths", default="8192,16384")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup-ms", type=float, default=100)
    ap.add_argument("--rep-ms", type=float, default=500)
    ap.add_argument("--workdir", default=None, help="scratch folder for the children (default: a temporary one)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.child:
        sys.path.insert(0, os.getcwd())
        return child(args)
    if not args.base or not os.path.isdir(os.path.join(args.base, "kernels")):
        raise SystemExit(f"--base: expected a checkout of the project (with kernels/), got {args.base!r}")
    import tempfile

    import torch

    sys.path.insert(0, ROOT)
    from benchmarks.kernel_ab import max_rel
    from benchmarks.result_file import run_header, write_result

    label = args.tree_label or subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                                              capture_output=True, text=True).stdout.strip() or "tree"
    workdir = args.workdir or tempfile.mkdtemp(prefix="tree_ab_")
    runs = {"tree": [], "base": []}
    for r in range(args.rounds):
        order = ("tree", "base") if r % 2 == 0 else ("base", "tree")
        for side in order:
            root = ROOT if side == "tree" else args.base
            runs[side].append(run_child(root, args, os.path.join(workdir, f"{side}{r}")))
            print(f"round {r} {side}: " + ", ".join(f"{c['H']}x{c['D']} {c['L']} acp={c['acp']} {c['ms']:.3f}"
                                                   for c in runs[side][-1]["cases"]), flush=True)
    result = run_header(gpus=1, tree_label=label, base_label=args.base_label, records=[], checks=[])
    for i, case in enumerate(runs["tree"][0]["cases"]):
        t = [run["cases"][i]["ms"] for run in runs["tree"]]
        b = [run["cases"][i]["ms"] for run in runs["base"]]
        rec = dict(bench="tree_ab", H=case["H"], D=case["D"], L=case["L"], B=case["B"], acp=case["acp"],
                   ms_tree=round(statistics.median(t), 4), ms_base=round(statistics.median(b), 4),
                   rounds={"tree": [round(x, 4) for x in t], "base": [round(x, 4) for x in b]})
        rec["change"] = round(rec["ms_tree"] / rec["ms_base"] - 1, 4)
        if case["acp"]:
            rec["kept_tiles_tree"] = round(case["kept_tiles"], 4)
            rec["kept_tiles_base"] = round(runs["base"][0]["cases"][i]["kept_tiles"], 4)
        result["records"].append(rec)
        print(f"{rec['H']}x{rec['D']} L={rec['L']} acp={rec['acp']}: {rec['ms_tree']:.3f} vs {rec['ms_base']:.3f} "
              f"({100 * rec['change']:+.1f}%)", flush=True)
    for ct, cb in zip(runs["tree"][0]["checks"], runs["base"][0]["checks"]):
        a, b = torch.load(ct["path"]), torch.load(cb["path"])
        diff = {n: round(max_rel(x, y), 6) for n, x, y in zip(("out", "dq", "dk", "dv", "dlog_f"), a, b)}
        result["checks"].append(dict(H=ct["H"], D=ct["D"], L=4096, acp=True, max_rel_diff=diff))
        print(f"check {ct['H']}x{ct['D']}: {diff}", flush=True)
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()
