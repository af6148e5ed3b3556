"""Kernel-alone A/B of a Gluon kernel module against another version of the same file.

    git show <rev>:kernels/forgetting_attn/gluon_fwd.py > /tmp/gluon_fwd_base.py
    python benchmarks/kernel_versions.py --kernel fwd --base /tmp/gluon_fwd_base.py --base-label <rev> \\
        --out benchmarks/results/<name>.json

kernel_ab.py switches between a Gluon kernel and the Triton kernel it
replaces; this script compares two versions of one Gluon kernel, the
tree's module and ``--base`` (a copy of the module file, loaded beside it
as a module of the same package).  It captures the launch arguments of
``gluon_fwd.launch_fwd`` (``--kernel fwd``) or ``gluon_bwd.launch_dkdv``
(``--kernel dkdv``, as the backward calls it: with or without the fused
dQ) in one forward + backward on BENCH.md's inputs (paper-like gates,
B = 32768 / L; ``--docs 8``: 8 packed documents per row), launches both
versions on fresh output buffers and reports the largest difference of
their outputs, then times that launch alone, both versions in
interleaved rounds (median of triton.testing.do_bench).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys

import torch
import triton
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.attention import TOKENS, doc_cu_seqlens, paper_like_inputs  # noqa: E402
from benchmarks.result_file import run_header, write_result  # noqa: E402
from fox_megatron.kernels import AcpConfig, forgetting_attention  # noqa: E402
from fox_megatron.kernels.forgetting_attn import gluon_bwd, gluon_fwd  # noqa: E402

PACKAGE = "fox_megatron.kernels.forgetting_attn"
# kernel -> (tree module, launch function, positions of the tensors it
# writes, positions of the tuples of tensors it adds into)
KERNELS = {
    "fwd": (gluon_fwd, "launch_fwd", (5, 6), ()),
    "dkdv": (gluon_bwd, "launch_dkdv", (10, 11, 12), (18,)),  # 18: the fused dQ's (dq, dc_q16)
}


def load_base(path, kernel):
    """The module file at ``path`` as ``<package>._base_<kernel>`` (so that
    its relative imports resolve)."""
    name = f"{PACKAGE}._base_{kernel}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def capture(module, fn_name, run):
    """The arguments of the last call of module.fn_name while run()."""
    seen = {}
    original = getattr(module, fn_name)

    def spy(*args):
        seen["call"] = args
        return original(*args)

    setattr(module, fn_name, spy)
    try:
        run()
    finally:
        setattr(module, fn_name, original)
    if "call" not in seen:
        raise SystemExit(f"{module.__name__}.{fn_name} was not called: is the Gluon path enabled for this shape?")
    return seen["call"]


def fresh(args, outputs, accumulators):
    """The (positional) call with zeroed copies of the tensors it writes,
    and those tensors."""
    args = list(args)
    written = []
    for i in outputs:
        args[i] = torch.zeros_like(args[i])
        written.append(args[i])
    for i in accumulators:
        if i < len(args) and args[i] is not None:
            args[i] = tuple(torch.zeros_like(t) for t in args[i])
            written.extend(args[i])
    return args, written


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernel", choices=sorted(KERNELS), required=True)
    ap.add_argument("--base", required=True, help="a copy of the kernel's module file to compare against")
    ap.add_argument("--base-label", default=None, help="what --base is (e.g. the git revision it came from)")
    ap.add_argument("--lengths", default="8192,16384")
    ap.add_argument("--shapes", default="16x128")
    ap.add_argument("--docs", default="1", help="documents per row, a list (packed through cu_seqlens when above 1)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup-ms", type=float, default=100)
    ap.add_argument("--rep-ms", type=float, default=300)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    tree, fn_name, outputs, accumulators = KERNELS[args.kernel]
    base = load_base(args.base, args.kernel)
    versions = {"tree": getattr(tree, fn_name), "base": getattr(base, fn_name)}
    records = []
    for shape in args.shapes.split(","):
        H, D = (int(x) for x in shape.split("x"))
        for L, docs, acp in ((L, d, a) for L in (int(x) for x in args.lengths.split(","))
                             for d in (int(x) for x in args.docs.split(",")) for a in (False, True)):
            B = max(1, TOKENS // L)
            q, k, v, log_f = paper_like_inputs(B, L, H, D, seed=0)  # leaves that require grad
            # packed documents come as a trainer gives them: cu_seqlens on the GPU and max_seqlen
            cu = doc_cu_seqlens(B, L, docs, q.device) if docs > 1 else None
            mx = L // docs if docs > 1 else None

            def step():
                out = forgetting_attention(q, k, v, log_f, cu_seqlens=cu, max_seqlen=mx,
                                           acp=AcpConfig() if acp else None)
                out.backward(torch.ones_like(out))

            call = capture(tree, fn_name, step)
            results = {}
            for name, launch in versions.items():
                a, written = fresh(call, outputs, accumulators)
                launch(*a)
                torch.cuda.synchronize()
                results[name] = written
            diff = max((x.double() - y.double()).abs().max().item()
                       for x, y in zip(results["tree"], results["base"]))
            rounds = {name: [] for name in versions}
            for _ in range(args.rounds):
                for name, launch in versions.items():
                    a, _ = fresh(call, outputs, accumulators)
                    rounds[name].append(triton.testing.do_bench(lambda: launch(*a),
                                                                warmup=args.warmup_ms, rep=args.rep_ms))
            rec = dict(bench="kernel_versions", kernel=args.kernel, H=H, D=D, L=L, B=B, docs=docs, acp=acp,
                       ms_tree=round(statistics.median(rounds["tree"]), 4),
                       ms_base=round(statistics.median(rounds["base"]), 4),
                       max_abs_diff=diff, rounds={n: [round(x, 4) for x in r] for n, r in rounds.items()})
            rec["change"] = round(rec["ms_tree"] / rec["ms_base"] - 1, 4)
            records.append(rec)
            print(f"{args.kernel} H={H} D={D} L={L} docs={docs} acp={acp}: tree {rec['ms_tree']:.3f} ms, "
                  f"base {rec['ms_base']:.3f} ms ({100 * rec['change']:+.1f}%), max |diff| {diff:.3g}",
                  flush=True)
    result = run_header(base_label=args.base_label, records=records)
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()
