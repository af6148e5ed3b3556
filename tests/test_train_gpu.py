"""The trainer's GPU path: megatron-core DDP, its optimizer (plain and
distributed), the pipeline-schedule entry point and dist_checkpointing.

Run on a CUDA machine (skipped elsewhere):  pytest -m gpu tests/test_train_gpu.py
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"


def _gpus():
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _train(nproc, run_dir, *overrides, timeout=540):
    env = dict(os.environ, PYTHONWARNINGS="ignore", CUDA_DEVICE_MAX_CONNECTIONS="1")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:0",
           "-m", "fox_megatron.train", "--config", str(DEMO), "--set",
           "launch.device=cuda", f"launch.nproc_per_node={nproc}", f"launch.run_dir={run_dir}",
           "log_interval=1", "eval_interval=null", "train_iters=12", "lr_warmup_iters=2",
           "seq_length=256", "num_workers=0", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    rec = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return proc.stdout, [r for r in rec if r["kind"] == "train"]


def test_gpu_bf16_trains_and_resumes(tmp_path):
    run1 = tmp_path / "a"
    out, rec = _train(1, run1, "bf16=true", "save_interval=6")
    losses = [r["loss"] for r in rec]
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.5, losses
    assert rec[-1]["mfu"] is not None and rec[-1]["mfu"] > 0
    assert rec[-1]["mem_gib"] > 0 and 0 < rec[-1]["acp_kept_fraction"] <= 1
    ckpt = run1 / "checkpoints" / "iter_0000006"
    assert (ckpt / "torch_dist").is_dir() and (run1 / "checkpoints" / "latest").read_text().strip() == "iter_0000012"
    run2 = tmp_path / "b"
    out, rec2 = _train(1, run2, "bf16=true", f"load={ckpt}", f"save={run2 / 'ckpt'}")
    assert "at iteration 6" in out
    resumed = [r["loss"] for r in rec2]
    assert [r["iteration"] for r in rec2] == list(range(7, 13))
    for a, b in zip(resumed, losses[6:]):
        assert math.isclose(a, b, rel_tol=2e-3), (resumed, losses[6:])


@pytest.mark.skipif(_gpus() < 2, reason="needs 2 GPUs")
def test_gpu_dp2_matches_dp1(tmp_path):
    # fp32, same global batch: DP=2 splits it, the per-token loss is the same.
    _, one = _train(1, tmp_path / "dp1", "bf16=false", "save=null", "save_interval=null", "load=null")
    _, two = _train(2, tmp_path / "dp2", "bf16=false", "save=null", "save_interval=null", "load=null")
    for a, b in zip(one, two):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4), (a["loss"], b["loss"])


@pytest.mark.skipif(_gpus() < 2, reason="needs 2 GPUs")
def test_gpu_pp2_trains_like_pp1(tmp_path):
    # fp32, the trainer through megatron-core's 1F1B schedule (4 micro-
    # batches).  As in Megatron-LM each pipeline stage seeds its own
    # initialisation, so the two runs start from different (equally
    # distributed) weights of the second half: the curves agree closely, not
    # exactly (tests/test_model_gpu.py compares PP = 2 from equal weights).
    _, one = _train(1, tmp_path / "pp1", "bf16=false", "save=null", "save_interval=null", "load=null")
    _, two = _train(2, tmp_path / "pp2", "bf16=false", "pipeline_model_parallel_size=2", "save=null",
                    "save_interval=null", "load=null")
    assert len(one) == len(two) == 12
    assert two[-1]["loss"] < two[0]["loss"] - 1.0
    for a, b in zip(one, two):
        assert math.isclose(a["loss"], b["loss"], rel_tol=2e-3), (a["loss"], b["loss"])


@pytest.mark.skipif(_gpus() < 2, reason="needs 2 GPUs")
def test_gpu_dp2_distributed_optimizer_matches_dp1(tmp_path):
    # fp32: the distributed optimizer (sharded Adam state, reduce-scatter /
    # all-gather) follows the plain DP = 1 run
    _, one = _train(1, tmp_path / "dp1", "bf16=false", "save=null", "save_interval=null", "load=null")
    _, two = _train(2, tmp_path / "dp2", "bf16=false", "use_distributed_optimizer=true", "save=null",
                    "save_interval=null", "load=null")
    assert len(one) == len(two) > 0
    for a, b in zip(one, two):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4), (a["loss"], b["loss"])


@pytest.mark.skipif(_gpus() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("bf16", ["true", "false"])
def test_gpu_distributed_optimizer_checkpoint(tmp_path, bf16):
    # Resuming restores the model, the sharded main weights and Adam's
    # moments and step count: the resumed curve is the uninterrupted one
    # (deterministic kernels and reductions, so equal up to rounding noise).
    # In fp32 the main weights are views of the model's parameters.
    run1 = tmp_path / "a"
    _, rec = _train(2, run1, f"bf16={bf16}", "use_distributed_optimizer=true", "save_interval=6")
    run2 = tmp_path / "b"
    out, rec2 = _train(2, run2, f"bf16={bf16}", "use_distributed_optimizer=true",
                       f"load={run1 / 'checkpoints' / 'iter_0000006'}", f"save={run2 / 'ckpt'}")
    assert "at iteration 6" in out
    resumed = [(r["iteration"], r["loss"], r["grad_norm"]) for r in rec2]
    straight = [(r["iteration"], r["loss"], r["grad_norm"]) for r in rec[6:]]
    # the whole curves in the message: where the drift starts tells what was not restored
    assert [i for i, *_ in resumed] == [i for i, *_ in straight], (resumed, straight)
    for (_, a, ga), (_, b, gb) in zip(resumed, straight):
        assert math.isclose(a, b, rel_tol=1e-5) and math.isclose(ga, gb, rel_tol=1e-4), (resumed, straight)
