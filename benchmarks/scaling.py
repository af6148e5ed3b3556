"""Scaling sweep on one node (BENCH.md "scaling" records): the same FoX (Pro)
config trained on 1, 2, 4, ... GPUs with a chosen parallel layout, weak
scaling in the data-parallel dimension (the global batch grows with DP so
that every GPU does the same work per step).

    python benchmarks/scaling.py configs/fox_pro_760m_16k.yaml --gpus 1,2,4,8 \
        --tp 1 --cp 1 --iters 30 --out benchmarks/results/scaling_h200.json

efficiency = tokens/s on N GPUs / (N / N_0 x tokens/s on the smallest N_0).
Across nodes, run it per node count through SLURM (fox-launch --slurm with
launch.nnodes) and merge the files; this script covers one node.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from result_file import run_header, write_result  # noqa: E402
from train_step import run_variant  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--gpus", default="1,2,4,8")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--cp", type=int, default=1)
    ap.add_argument("--acp", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--micro-batch-size", type=int, default=1)
    ap.add_argument("--micro-batches", type=int, default=4, help="micro-batches per DP rank per step")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--size", default=None)
    ap.add_argument("--set", nargs="*", default=[], dest="overrides")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    header = run_header()
    size = args.size or Path(args.config).stem.split("_")[2]
    records = []
    model_parallel = args.tp * args.pp * args.cp
    with tempfile.TemporaryDirectory(prefix="fox-scaling-") as workdir:
        for n in (int(x) for x in args.gpus.split(",")):
            if n % model_parallel:
                print(f"skip {n} GPUs: not a multiple of TP x PP x CP = {model_parallel}")
                continue
            dp = n // model_parallel
            sets = [
                "mock_data=true", "data_path=[]", "tokenizer_type=ByteTokenizer", "tokenizer_model=null",
                f"fox.acp={'true' if args.acp else 'false'}",
                f"tensor_model_parallel_size={args.tp}", f"pipeline_model_parallel_size={args.pp}",
                f"context_parallel_size={args.cp}", f"sequence_parallel={'true' if args.tp > 1 else 'false'}",
                f"micro_batch_size={args.micro_batch_size}",
                f"global_batch_size={args.micro_batch_size * args.micro_batches * dp}",
                *args.overrides,
            ]
            res = run_variant(args.config, f"gpus{n}", sets, args.iters, args.warmup, n, workdir)
            rec = {"bench": "scaling", "model": "fox_pro", "size": size, "L": res["L"], "gpus": n, "dp": dp,
                   "tp": args.tp, "pp": args.pp, "cp": args.cp, "acp": args.acp,
                   "tokens_per_s": res["tokens_per_s"], "mfu": res["mfu"], "peak_mem_gb": res["peak_mem_gb"],
                   "kept_fraction": res["kept_fraction"], "steps_measured": res["steps_measured"],
                   "final_loss": res["final_loss"]}
            base = records[0] if records else rec
            rec["efficiency"] = rec["tokens_per_s"] / (n / base["gpus"] * base["tokens_per_s"])
            records.append(rec)
            print(json.dumps(rec), flush=True)
            if args.out:
                write_result(args.out, {**header, "records": records})
    print(f"\n{'gpus':>5} {'dp':>4} {'tokens/s':>11} {'efficiency':>11}")
    for r in records:
        print(f"{r['gpus']:>5} {r['dp']:>4} {r['tokens_per_s']:>11.0f} {r['efficiency']:>11.3f}")


if __name__ == "__main__":
    main()
