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
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

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
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    data = [f"data_path=[{args.data}]", "mock_data=false"] if args.data else [
        "mock_data=true", "data_path=[]", "tokenizer_type=ByteTokenizer", "tokenizer_model=null"]
    size = args.size or Path(args.fox).stem.split("_")[2]
    variants = [
        ("fox_pro_acp", args.fox, "fox_pro", True, ["fox.acp=true"]),
        ("fox_pro_full", args.fox, "fox_pro", False, ["fox.acp=false"]),
        ("transformer", args.baseline, "transformer", False, []),
    ]
    import torch

    header = {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "gpus": args.gpus,
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join(sys.argv),
    }
    records = []
    with tempfile.TemporaryDirectory(prefix="fox-train-bench-") as workdir:
        for label, config, model, acp, extra in variants:
            res = run_variant(config, label, data + extra + args.overrides, args.iters, args.warmup,
                              args.gpus, workdir)
            rec = {"bench": "train", "model": model, "acp": acp, "size": size, "gpus": args.gpus, **res}
            records.append(rec)
            print(json.dumps(rec), flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps({**header, "records": records}, indent=1))
    base = next(r for r in records if r["model"] == "transformer")
    print(f"\n{'variant':<14} {'tokens/s':>10} {'MFU':>6} {'mem GB':>7} {'kept':>6} {'vs transformer':>15}")
    for (label, *_), r in zip(variants, records):
        mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "n/a"
        kept = f"{r['kept_fraction']:.3f}" if r["kept_fraction"] is not None else "-"
        print(f"{label:<14} {r['tokens_per_s']:>10.0f} {mfu:>6} {r['peak_mem_gb']:>7.1f} {kept:>6} "
              f"{r['tokens_per_s'] / base['tokens_per_s']:>15.3f}")


if __name__ == "__main__":
    main()
