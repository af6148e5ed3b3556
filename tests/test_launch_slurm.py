"""fox-launch --slurm against a real SLURM cluster.

Needs a running cluster; on one machine: tests/slurm/start_cluster.sh (as
root, after `apt-get install -y slurm-wlm munge`). Skipped only when sbatch
is not installed; with sbatch installed and no cluster answering, it fails.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "configs" / "demo.yaml"
START = REPO / "tests" / "slurm" / "start_cluster.sh"
TIMEOUT_S = 600

HAVE_SBATCH = shutil.which("sbatch") is not None
HAVE_TRAINER = importlib.util.find_spec("fox_megatron.train.__main__") is not None


def cluster_up() -> str:
    """'' when the controller answers and a node can take jobs; otherwise why not."""
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    if "UP" not in ping.stdout:
        return f"slurmctld does not answer ({(ping.stdout + ping.stderr).strip()})"
    nodes = subprocess.run(["sinfo", "--noheader", "--format=%t"], capture_output=True, text=True)
    states = nodes.stdout.split()
    if not any(s.rstrip("*") in ("idle", "mix", "alloc") for s in states):
        return f"no usable node (sinfo states: {states or 'none'})"
    return ""


def job_state(job_id: str) -> str:
    """The job's state from the controller (kept for MinJobAge after the
    end), or from accounting when the controller has forgotten it."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    m = re.search(r"\bJobState=(\S+)", out)
    if m:
        return m.group(1)
    if shutil.which("sacct"):
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"],
                             capture_output=True, text=True).stdout.split()
        if out:
            return out[0].split()[0]
    return "UNKNOWN"


def wait_for(job_id: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = job_state(job_id)
        if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "UNKNOWN"):
            return state
        time.sleep(1)
    subprocess.run(["scancel", job_id])
    return "TIMEOUT (cancelled by the test)"


@pytest.fixture(scope="module")
def slurm_cluster():
    if not HAVE_SBATCH:
        pytest.skip("sbatch is not installed (apt-get install -y slurm-wlm munge, then tests/slurm/start_cluster.sh)")
    why = cluster_up()
    if why:
        pytest.fail(f"sbatch is installed but the SLURM cluster is not usable: {why}; start it with {START}")


def submit(run_dir: Path, *overrides: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "fox_megatron.launch", str(DEMO), "--slurm",
         "--set", f"launch.run_dir={run_dir}", *overrides],
        capture_output=True, text=True, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    m = re.search(r"Submitted job (\d+)", proc.stdout)
    assert m, proc.stdout
    job_id = m.group(1)
    assert (run_dir / "slurm_job_id").read_text().strip() == job_id
    return job_id


def finished(run_dir: Path, job_id: str) -> str:
    state = wait_for(job_id, TIMEOUT_S)
    out_file = run_dir / f"slurm-{job_id}.out"
    log = out_file.read_text() if out_file.exists() else "(no output file)"
    assert state == "COMPLETED", f"job {job_id} ended {state}; output:\n{log[-4000:]}"
    return log


@pytest.mark.skipif(not HAVE_TRAINER, reason="fox_megatron.train is not available")
def test_demo_trains_under_slurm(slurm_cluster, tmp_path):
    """The real demo (2 CPU processes under one srun task) runs to the end."""
    run_dir = tmp_path / "demo"
    job_id = submit(run_dir)
    log = finished(run_dir, job_id)
    assert (run_dir / "config.yaml").exists() and (run_dir / "sbatch.sh").exists()
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert metrics, log[-2000:]
    losses = [m["loss"] for m in metrics if m.get("kind", "train") == "train" and "loss" in m]
    assert losses and losses[-1] < losses[0], losses
    ckpts = run_dir / "checkpoints"
    assert ckpts.is_dir() and any(ckpts.iterdir()), log[-2000:]


def test_job_runs_one_torchrun_per_node(slurm_cluster, tmp_path):
    """The generated script, run by SLURM: the rendezvous comes from the node
    list and the task gets its node rank. A stand-in interpreter records the
    torchrun command instead of starting it, so this does not depend on the
    trainer."""
    record = tmp_path / "record.json"
    stand_in = tmp_path / "python-stand-in"
    stand_in.write_text(
        "#!/bin/bash\n"
        f'{sys.executable} -c \'import json, os, sys; json.dump({{"argv": sys.argv[1:], '
        '"node": os.environ.get("SLURM_NODEID"), "device": os.environ.get("FOX_DEVICE")}, '
        f'open("{record}", "w"))\' "$@"\n'
    )
    stand_in.chmod(0o755)
    run_dir = tmp_path / "run"
    job_id = submit(run_dir, f"launch.python={stand_in}")
    finished(run_dir, job_id)
    got = json.loads(record.read_text())
    argv = got["argv"]
    host = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    node = re.search(r"\bNodeList=(\S+)", host).group(1)
    assert got["node"] == "0" and got["device"] == "cpu"
    assert argv[argv.index("--nnodes") + 1] == "1" and argv[argv.index("--node_rank") + 1] == "0"
    assert argv[argv.index("--master_addr") + 1] == node
    assert argv[argv.index("--master_port") + 1] == str(20000 + int(job_id) % 20000)
    assert argv[-2:] == ["--config", str(run_dir / "config.yaml")]


@pytest.mark.skipif(not HAVE_TRAINER, reason="fox_megatron.train is not available")
def test_killed_worker_restarts_under_slurm(slurm_cluster, tmp_path):
    """launch.max_restarts under SLURM: the job's torchrun (a c10d rendezvous
    on the allocation's first node) starts its workers again after one is
    killed, and the job completes from the latest checkpoint."""
    from test_train_faults import trainer_pid
    from test_train_preemption import _train_records

    run_dir = tmp_path / "faulty"
    job_id = submit(run_dir, "launch.max_restarts=1", "train_iters=12", "save_interval=3", "log_interval=1",
                    "eval_interval=null")
    script = (run_dir / "sbatch.sh").read_text()
    assert "--max-restarts 1" in script and "--rdzv_backend c10d" in script
    deadline = time.monotonic() + TIMEOUT_S
    while len(_train_records(run_dir)) < 5:
        state = job_state(job_id)
        assert state in ("PENDING", "CONFIGURING", "RUNNING", "UNKNOWN"), f"job {job_id} is {state}"
        assert time.monotonic() < deadline, "the job did not reach iteration 5"
        time.sleep(0.5)
    victim = trainer_pid(run_dir, 1)
    assert victim is not None, "no worker of rank 1 found"
    os.kill(victim, 9)
    log = finished(run_dir, job_id)
    assert "torchrun restart 1: training goes on from iteration" in log, log[-4000:]
    final = {r["iteration"] for r in _train_records(run_dir)}
    assert sorted(final) == list(range(1, 13))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000012"
