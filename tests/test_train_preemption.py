"""Preemption: SIGTERM to torchrun (as SLURM sends it) makes the 2-process
CPU run finish its step, save a checkpoint and exit with EXIT_PREEMPTED;
re-running resumes and reproduces an uninterrupted run bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fox_megatron.train.preemption import EXIT_PREEMPTED

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
# the LR schedule must not depend on train_iters, which differs between runs
COMMON = ["log_interval=1", "save_interval=null", "eval_interval=null", "lr_decay_iters=400"]


def _cmd(run_dir, *overrides):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", "0", "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:0",
            "-m", "fox_megatron.train", "--config", str(DEMO), "--set", *COMMON,
            f"launch.run_dir={run_dir}", *overrides]


def _train_records(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("kind") == "train"]


def _run(cmd, timeout=240):
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_sigterm_saves_and_resume_is_bit_exact(tmp_path):
    run = tmp_path / "preempted"
    proc = subprocess.Popen(_cmd(run, "train_iters=400"), cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while len(_train_records(run)) < 5:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "the run did not reach iteration 5"
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert "stopped by signal at iteration" in out, out[-3000:]
    assert proc.returncode != 0  # torchrun reports the signal; the workers exit EXIT_PREEMPTED
    stopped = int(out.split("stopped by signal at iteration")[1].split()[0])
    assert 5 <= stopped < 400
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == f"iter_{stopped:07d}"
    before = _train_records(run)

    # the same command again resumes from that checkpoint
    target = stopped + 4
    out = _run(_cmd(run, f"train_iters={target}"))
    assert f"at iteration {stopped}" in out
    resumed = [r for r in _train_records(run) if r["iteration"] > stopped]
    assert [r["iteration"] for r in resumed] == list(range(stopped + 1, target + 1))

    # an uninterrupted run of the same length gives the same losses, bit for bit
    ref = tmp_path / "reference"
    _run(_cmd(ref, f"train_iters={target}"))
    ref_losses = [r["loss"] for r in _train_records(ref)]
    assert [r["loss"] for r in before if r["iteration"] <= stopped] == ref_losses[:stopped]
    assert [r["loss"] for r in resumed] == ref_losses[stopped:]


def test_worker_exit_code_is_tempfail():
    assert EXIT_PREEMPTED == 75
