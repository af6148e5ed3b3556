"""Training-step benchmark (BENCH.md "Training step"): FoX (Pro) with ACP,
FoX without ACP, and the standard RoPE transformer, same trainer, same data,
same parallel layout, one after the other in one run.

Each variant is a real trainer run started through the launcher; the
numbers are read back from its metrics file (median over the logged steps
after warm-up).  Writes benchmarks/results/<name>.json records
{"bench": "train", "model", "acp", "size", "L", "gpus", "tokens_per_s",
"mfu", "peak_mem_gb", "kept_fraction", ...}.

    python benchmarks/train_step.py --fox configs/fox_pro_760m_16k.yaml \
        --baseline configs/transformer_760m_16k.yaml --gpus 1 --iters 30 \
        --out benchmarks/results/train_step_h100.json

Extra --set overrides apply to every variant (e.g. micro_batch_size=1).
Without --data the runs use Megatron's mock dataset.

--repeats N runs the three variants N times, interleaved (A B C A B C ...),
so that drift between runs falls on all of them alike; each record then
holds every run's tokens/s, their median and their spread.  Short runs of
one variant can differ by more than the effects being compared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from result_file import run_header, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run_variant(config, label, overrides, iters, warmup, gpus, workdir):
    run_dir = Path(workdir) / label
    sets = [
        # a short run: the recipe's warm-up would outlast it (the rate does not change the step time)
        f"train_iters={iters}", f"lr_warmup_iters={max(1, iters // 4)}",
        "log_interval=1", "eval_interval=null", "save=null", "load=null", "save_interval=null",
        f"launch.nproc_per_node={gpus}", "launch.nnodes=1", f"launch.run_dir={run_dir}",
        *overrides,
    ]
    cmd = [sys.executable, "-m", "fox_megatron.launch", str(config), "--local", "--set", *sets]
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", flush=True)
        raise RuntimeError(f"{label}: trainer exited with {proc.returncode}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("kind") == "train" and r["iteration"] > warmup]
    if not steps:
        raise RuntimeError(f"{label}: no logged steps after warm-up {warmup}")
    resolved = __import__("yaml").safe_load((run_dir / "config.yaml").read_text())
    kept = [r["acp_kept_fraction"] for r in steps if r.get("acp_kept_fraction") is not None]
    mfu = [r["mfu"] for r in steps if r.get("mfu") is not None]
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps),
        "tflops_per_gpu": statistics.median(r["tflops_per_gpu"] for r in steps),
        "mfu": statistics.median(mfu) if mfu else None,
        "peak_mem_gb": max(r["mem_gib"] for r in steps) * 2**30 / 1e9,
        "kept_fraction": statistics.median(kept) if kept else None,
        "L": resolved["seq_length"],
        "micro_batch_size": resolved["micro_batch_size"],
        "global_batch_size": resolved["global_batch_size"],
        "steps_measured": len(steps),
        "final_loss": steps[-1]["loss"],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fox", required=True, help="FoX (Pro) config")
    ap.add_argument("--baseline", required=True, help="standard-transformer config of the same size")
    ap.add_argument("--size", default=None, help="size label for the records (default: from the file name)")
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--data", default=None, help="indexed data prefix; default: mock data")
    ap.add_argument("--set", nargs="*", default=[], dest="overrides")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each variant, interleaved")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")

    data = [f"data_path=[{args.data}]", "mock_data=false"] if args.data else [
        "mock_data=true", "data_path=[]", "tokenizer_type=ByteTokenizer", "tokenizer_model=null"]
    size = args.size or Path(args.fox).stem.split("_")[2]
    variants = [
        ("fox_pro_acp", args.fox, "fox_pro", True, ["fox.acp=true"]),
        ("fox_pro_full", args.fox, "fox_pro", False, ["fox.acp=false"]),
        ("transformer", args.baseline, "transformer", False, []),
    ]
    header = run_header(gpus=args.gpus)
    runs = {label: [] for label, *_ in variants}
    records = []
    with tempfile.TemporaryDirectory(prefix="fox-train-bench-") as workdir:
        for rep in range(args.repeats):
            for label, config, model, acp, extra in variants:
                name = label if args.repeats == 1 else f"{label}_{rep}"
                runs[label].append(run_variant(config, name, data + extra + args.overrides, args.iters,
                                               args.warmup, args.gpus, workdir))
                records = [{"bench": "train", "model": model, "acp": acp, "size": size, "gpus": args.gpus,
                            **combine_runs(runs[lab])}
                           for lab, _, model, acp, _ in variants if runs[lab]]
                print(json.dumps(records[-1] if rep == 0 else {"variant": label, **runs[label][-1]}), flush=True)
                if args.out:
                    write_result(args.out, {**header, "repeats": args.repeats, "records": records})
    print(summary_table([label for label, *_ in variants], records))


def combine_runs(runs):
    """One record from repeated runs of a variant: medians (peak memory: the
    largest), every run's tokens/s and final loss, and the tokens/s spread,
    (max - min) / median."""
    rec = dict(runs[0])
    if len(runs) == 1:
        return rec
    tps = [r["tokens_per_s"] for r in runs]
    rec["tokens_per_s"] = statistics.median(tps)
    rec["tokens_per_s_runs"] = tps
    rec["tokens_per_s_spread"] = (max(tps) - min(tps)) / statistics.median(tps)
    for key in ("tflops_per_gpu", "mfu", "kept_fraction"):
        vals = [r[key] for r in runs if r.get(key) is not None]
        rec[key] = statistics.median(vals) if vals else None
    rec["peak_mem_gb"] = max(r["peak_mem_gb"] for r in runs)
    rec["steps_measured"] = sum(r["steps_measured"] for r in runs)
    rec["final_loss"] = [r["final_loss"] for r in runs]
    return rec


def summary_table(labels, records):
    """The variants against the transformer (median tokens/s; with repeats,
    the range of the runs)."""
    base = next(r for r in records if r["model"] == "transformer")
    lines = [f"\n{'variant':<14} {'tokens/s':>10} {'runs':>19} {'MFU':>6} {'mem GB':>7} {'kept':>6} "
             f"{'vs transformer':>15}"]
    for label, r in zip(labels, records):
        mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "n/a"
        kept = f"{r['kept_fraction']:.3f}" if r["kept_fraction"] is not None else "-"
        runs = r.get("tokens_per_s_runs")
        span = f"{min(runs):.0f}-{max(runs):.0f}" if runs else "-"
        lines.append(f"{label:<14} {r['tokens_per_s']:>10.0f} {span:>19} {mfu:>6} {r['peak_mem_gb']:>7.1f} {kept:>6} "
                     f"{r['tokens_per_s'] / base['tokens_per_s']:>15.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
