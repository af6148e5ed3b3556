"""Run the GPU-only checks of the project in one call and record the outcome.

Each step is a shell command (a pytest selection, a benchmark, the
Megatron-LM drop-in); its exit code, wall time, pytest's summary line and
the failing test lines are written to a JSON report after every step, so a
run that is cut short keeps what finished.

    python benchmarks/gpu_checks.py --out results.json cp_tests cp_bench model_tests dropin_tp2
    python benchmarks/gpu_checks.py --list

The drop-in steps run Megatron-LM's own pretrain_gpt.py with
``--spec fox_megatron.model.spec fox_layer_spec``; they need a Megatron-LM
checkout (``megatron/``, ``pretrain_gpt.py``, ``gpt_builders.py``,
``model_provider.py``) in the folder given by --megatron-lm.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Megatron-LM flags for a run without Transformer Engine / Apex fusions
# (Megatron-LM's "local" implementation), mock data and a tiny FoX model.
DROPIN_FLAGS = (
    "--transformer-impl local --no-rope-fusion --mock-data --tokenizer-type NullTokenizer --vocab-size 4096 "
    "--no-gradient-accumulation-fusion --no-masked-softmax-fusion --no-bias-gelu-fusion "
    "--no-bias-dropout-fusion --no-persist-layer-norm --bf16 "
    "--num-layers 4 --hidden-size 512 --num-attention-heads 8 --seq-length 2048 --max-position-embeddings 2048 "
    "--position-embedding-type none --normalization RMSNorm --swiglu --disable-bias-linear "
    "--micro-batch-size 2 --global-batch-size 16 --train-iters 40 --lr 1e-3 --min-lr 1e-4 "
    "--lr-decay-style cosine --lr-warmup-iters 5 --log-interval 10 --eval-iters 0 --eval-interval 1000 "
    "--split 100,0,0 --seed 1234"
)


def steps(nproc: int, mlm: str) -> dict:
    py = sys.executable
    tr = f"{py} -m torch.distributed.run --nproc_per_node"
    spec = "--spec fox_megatron.model.spec fox_layer_spec"
    dropin = f"cd {mlm} && CUDA_DEVICE_MAX_CONNECTIONS=1 PYTHONPATH={ROOT}:$PYTHONPATH {tr} {{n}} pretrain_gpt.py {DROPIN_FLAGS} {spec} {{extra}}"
    return {
        "cp_tests": f"{py} -m pytest -q -rf -m gpu tests/test_cp_attention.py",
        "cp_bench": (f"{tr} {nproc} benchmarks/cp_attention.py --out {{out_dir}}/cp_attention.json && "
                     f"{py} benchmarks/cp_attention.py --out {{out_dir}}/cp_attention.json"),
        "model_tests": f"{py} -m pytest -q -rf tests/test_model_gpu.py tests/test_train_gpu.py",
        "model_ckpt": (f"{py} -m pytest -q -rf tests/test_model_gpu.py tests/test_train_gpu.py "
                       "-k 'dist_checkpointing or distributed_optimizer_checkpoint'"),
        "train_tests": f"{py} -m pytest -q -rf tests/test_train_gpu.py",
        "pp_tests": (f"{py} -m pytest -q -rf tests/test_train_gpu.py tests/test_model_gpu.py "
                     "-k 'pp2 or pipeline_layouts'"),
        "chunk_docs": f"{py} -m pytest -q -rf tests/test_kernel_chunk_documents.py",
        "kernel_fp32": f"{py} -m pytest -q -rf tests/test_kernel_forgetting_attention.py -k fp32",
        "kernel_tests": f"{py} -m pytest -q -rf tests/test_kernel_forgetting_attention.py",
        "kernel_gpu_tests": f"{py} -m pytest -q -rf -m gpu tests/test_kernel_forgetting_attention.py",
        # every kernel test (CPU ones included) on the GPU, in one process
        "kernel_all": (f"{py} -m pytest -q -rf tests/test_kernel_forgetting_attention.py "
                       "tests/test_kernel_chunk_rows.py tests/test_kernel_chunk_documents.py"),
        # BENCH.md's kernel protocol in two calls that fit a device call's limit
        "attention_bench": (f"{py} benchmarks/attention.py --variants full,acp "
                            f"--out {{out_dir}}/attention.json"),
        "attention_packed": (f"{py} benchmarks/attention.py --variants docs,docs_acp,separate,separate_acp "
                             f"--peers fla_fox --out {{out_dir}}/attention_packed.json"),
        "model_125m": f"{py} -m pytest -q -rf tests/test_model_gpu.py -k 125m",
        "dropin_tp2": dropin.format(n=2, extra="--tensor-model-parallel-size 2"),
        # needs a norm with sequence-parallel support for the final norm (Transformer Engine or Apex)
        "dropin_tp2_sp": dropin.format(n=2, extra="--tensor-model-parallel-size 2 --sequence-parallel"),
        "dropin_pp2": dropin.format(n=2, extra="--pipeline-model-parallel-size 2"),
        "dropin_cp2": dropin.format(n=2, extra="--context-parallel-size 2"),
        "dropin_noacp": dropin.format(n=1, extra="").replace("fox_layer_spec", "fox_layer_spec_no_acp"),
    }


def summarize(text: str) -> dict:
    lines = text.splitlines()
    summary = next((ln.strip("= ") for ln in reversed(lines)
                    if re.search(r"\d+ (passed|failed|error|skipped)", ln)), None)
    failures = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))][:40]
    losses = [ln.strip() for ln in lines if "lm loss" in ln][-6:]  # Megatron-LM's log lines
    return {"summary": summary, "failures": failures, "megatron_log": losses, "tail": lines[-15:]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "gpu_checks.json"))
    ap.add_argument("--megatron-lm", default=os.path.join(ROOT, ".mlm"))
    ap.add_argument("--timeout", type=int, default=600, help="seconds per step")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()

    import torch
    import triton

    nproc = torch.cuda.device_count()
    table = steps(nproc, os.path.abspath(args.megatron_lm))
    if args.list or not args.names:
        for k, v in table.items():
            print(f"{k:14s} {v}")
        return
    unknown = [n for n in args.names if n not in table]
    if unknown:
        sys.exit(f"unknown step(s) {unknown}; known: {sorted(table)}")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    doc = {"gpu": torch.cuda.get_device_name() if nproc else "cpu", "gpus": nproc, "torch": torch.__version__,
           "triton": triton.__version__, "date": datetime.date.today().isoformat(),
           "command": " ".join(["python", "benchmarks/gpu_checks.py"] + args.names), "runs": []}
    for name in args.names:
        cmd = table[name].format(out_dir=out_dir)
        t0 = time.time()
        try:
            proc = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
            rc, text = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            rc = "timeout"
            text = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
        rec = {"step": name, "command": cmd.replace(ROOT, "."), "rc": rc, "seconds": round(time.time() - t0, 1)}
        rec.update(summarize(text))
        doc["runs"].append(rec)
        if rc != 0:
            rec["tail"] = text.splitlines()[-80:]
        # one log file for the whole run (the output of every step, in order)
        with open(os.path.splitext(args.out)[0] + ".log", "a") as f:
            f.write(f"\n===== {name}: {cmd}\n{text}")
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"{name:14s} rc={rc} {rec['seconds']:7.1f}s {rec['summary'] or ''}", flush=True)


if __name__ == "__main__":
    main()
